"""Word lists of the sandbox world: genres, keywords, title words, names, places.

Everything here is invented vocabulary; the only structure is which words belong to which
genre. That structure is what makes the world learnable: a genre's films share keywords and
title words, and a user who likes a genre uses that genre's words when asking.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Genre:
    """One genre and the words attached to it.

    name:      the genre as written in the catalog (``genres`` field).
    weight:    relative frequency among films.
    eras:      (first year, last year, multiplier) windows that make the genre more or less
               common in those years (westerns in the 1950s, science fiction later, ...).
    synonyms:  how users name the genre in a conversation ("sci-fi", "scary", ...).
    moods:     adjectives users use for it ("something creepy").
    nouns, adjectives: title words typical of the genre.
    keywords:  plot keywords typical of the genre.
    blurb:     one sentence a plot summary of the genre may contain.
    """

    name: str
    weight: float
    eras: tuple[tuple[int, int, float], ...]
    synonyms: tuple[str, ...]
    moods: tuple[str, ...]
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    keywords: tuple[str, ...]
    blurb: tuple[str, ...]


GENRES: tuple[Genre, ...] = (
    Genre("Action", 1.2, ((1940, 1969, 0.4), (1980, 2024, 1.3)),
          ("action", "action-packed", "high-octane action"), ("explosive", "adrenaline-fuelled"),
          ("Strike", "Fury", "Impact", "Vendetta", "Crossfire", "Takedown", "Bullet", "Siege", "Velocity", "Renegade"),
          ("Lethal", "Deadly", "Maximum", "Iron", "Hard"),
          ("car chase", "martial arts", "explosions", "bodyguard", "mercenary", "shootout", "hostage rescue"),
          ("Fists fly and cars burn as the body count climbs.", "Every deal ends in a shootout.")),
    Genre("Adventure", 0.8, (),
          ("adventure", "swashbuckling", "epic adventure"), ("adventurous", "epic"),
          ("Quest", "Voyage", "Expedition", "Treasure", "Journey", "Island", "Compass", "Frontier"),
          ("Lost", "Hidden", "Great", "Wild", "Forgotten"),
          ("treasure hunt", "jungle", "pirates", "shipwreck", "lost city", "desert", "mountain climbing"),
          ("Maps, rivals and ruins stand between them and the prize.", "The journey matters more than the gold.")),
    Genre("Animation", 0.5, ((1940, 1979, 0.5), (1995, 2024, 1.4)),
          ("animated", "animation", "cartoon"), ("colourful", "whimsical"),
          ("Whiskers", "Toybox", "Balloon", "Dragonfly", "Lantern", "Pebble", "Marbles"),
          ("Little", "Tiny", "Magic", "Brave"),
          ("talking animals", "hand-drawn animation", "stop motion", "toys", "anime", "musical numbers"),
          ("Bright colours hide a surprisingly moving story.", "Talking creatures steal every scene.")),
    Genre("Comedy", 1.6, (),
          ("comedy", "funny", "hilarious"), ("funny", "light-hearted"),
          ("Wedding", "Roommates", "Weekend", "Neighbors", "Party", "Trouble", "Hangover", "Vacation"),
          ("Crazy", "Awkward", "Big", "Happy", "Dumb"),
          ("road trip", "mistaken identity", "slapstick", "satire", "mockumentary", "bachelor party", "office life"),
          ("One bad idea leads to a worse one.", "Nothing goes to plan, and that is the joke.")),
    Genre("Crime", 1.0, (),
          ("crime", "gangster", "heist"), ("gritty", "hard-boiled"),
          ("Heist", "Syndicate", "Racket", "Mob", "Job", "Alibi", "Score", "Contract"),
          ("Dirty", "Crooked", "Cold", "Blue", "Criminal"),
          ("heist", "mafia", "drug cartel", "bank robbery", "undercover cop", "corruption", "prison"),
          ("Loyalty is cheap and betrayal is expensive.", "The police are always one step behind.")),
    Genre("Drama", 1.8, (),
          ("drama", "dramatic", "character-driven"), ("moving", "heartfelt"),
          ("Silence", "Letters", "Seasons", "River", "Harvest", "Portrait", "Promise", "Mother"),
          ("Quiet", "Long", "Broken", "Last", "Gentle"),
          ("family", "grief", "coming of age", "addiction", "small town", "illness", "friendship"),
          ("Old wounds open as a family is forced together.", "A quiet story about what people owe each other.")),
    Genre("Family", 0.5, ((1980, 2024, 1.2),),
          ("family", "family-friendly", "kid-friendly"), ("wholesome", "heart-warming"),
          ("Puppy", "Christmas", "Camp", "Treehouse", "Pony", "Holiday"),
          ("Lucky", "Merry", "Sunny", "Best"),
          ("christmas", "dog", "summer camp", "siblings", "school", "holiday"),
          ("A story the whole family can watch together.", "Kids save the day while the grown-ups bicker.")),
    Genre("Fantasy", 0.6, ((1940, 1979, 0.5), (2000, 2024, 1.3)),
          ("fantasy", "magical", "sword and sorcery"), ("magical", "enchanting"),
          ("Kingdom", "Sorcerer", "Crown", "Dragon", "Realm", "Spellbook", "Throne", "Prophecy"),
          ("Enchanted", "Elven", "Golden", "Ancient", "Dark"),
          ("magic", "dragons", "wizard", "fairy tale", "sword fight", "prophecy", "curse"),
          ("An old prophecy wakes and the kingdom trembles.", "Magic always comes with a price.")),
    Genre("Horror", 1.0, ((1970, 2024, 1.2),),
          ("horror", "scary", "creepy"), ("creepy", "terrifying"),
          ("Haunting", "Curse", "Blood", "Cellar", "Shadows", "Ritual", "Possession", "Scream"),
          ("Evil", "Wicked", "Bloody", "Unholy", "Silent"),
          ("haunted house", "slasher", "zombies", "vampires", "demonic possession", "serial killer", "found footage"),
          ("As the nights grow darker, something evil closes in.", "Nobody believes them until it is too late.")),
    Genre("Musical", 0.35, ((1940, 1969, 2.5), (1970, 2024, 0.6)),
          ("musical", "singing", "song-and-dance"), ("toe-tapping", "upbeat"),
          ("Melody", "Rhythm", "Ballroom", "Broadway", "Jukebox", "Encore", "Serenade"),
          ("Swinging", "Singing", "Dancing", "Jazzy"),
          ("dance", "broadway", "jazz", "rock band", "singer", "talent show"),
          ("Every feeling becomes a song.", "The big number at the end brings the house down.")),
    Genre("Mystery", 0.7, (),
          ("mystery", "whodunit", "puzzle"), ("puzzling", "twisty"),
          ("Clue", "Secret", "Riddle", "Manor", "Witness", "Disappearance", "Key"),
          ("Missing", "Strange", "Secret", "Vanishing"),
          ("detective", "murder investigation", "amnesia", "twist ending", "conspiracy", "missing person"),
          ("Every clue points somewhere else.", "The truth is hidden in plain sight.")),
    Genre("Romance", 1.0, (),
          ("romance", "romantic", "love story"), ("romantic", "sweet"),
          ("Love", "Kiss", "Heart", "Summer", "Valentine", "Affair", "Sweetheart"),
          ("Sweet", "Tender", "Forever", "Endless", "Beautiful"),
          ("love triangle", "wedding", "first love", "long distance", "paris", "forbidden love"),
          ("Two strangers keep meeting at the wrong moment.", "Love arrives when nobody planned for it.")),
    Genre("Science Fiction", 0.8, ((1940, 1969, 0.5), (1977, 2024, 1.3)),
          ("sci-fi", "science fiction", "futuristic"), ("mind-bending", "futuristic"),
          ("Orbit", "Signal", "Protocol", "Galaxy", "Android", "Colony", "Horizon", "Nebula"),
          ("Quantum", "Infinite", "Stellar", "Synthetic", "Final"),
          ("time travel", "space station", "artificial intelligence", "aliens", "dystopia", "cyberpunk", "robots"),
          ("The future arrives sooner than anyone expected.", "Out among the stars, the rules are different.")),
    Genre("Thriller", 1.1, (),
          ("thriller", "suspense", "suspenseful"), ("tense", "gripping"),
          ("Trap", "Pursuit", "Stranger", "Deadline", "Panic", "Obsession", "Target"),
          ("Fatal", "Desperate", "Midnight", "Dangerous", "Blind"),
          ("stalker", "kidnapping", "psychological", "espionage", "cat and mouse", "revenge"),
          ("The clock is ticking and nobody can be trusted.", "Paranoia tightens with every scene.")),
    Genre("War", 0.4, ((1940, 1969, 2.0), (1970, 2024, 0.8)),
          ("war", "war movie", "military"), ("harrowing", "epic"),
          ("Battalion", "Trenches", "Front", "Soldier", "Battle", "Platoon", "Beachhead"),
          ("Brave", "Fallen", "Red", "Bitter"),
          ("world war ii", "vietnam", "soldiers", "resistance", "submarine", "prisoner of war"),
          ("Far from home, a unit fights to survive.", "War leaves no one unchanged.")),
    Genre("Western", 0.35, ((1940, 1969, 4.0), (1970, 1989, 1.0), (1990, 2024, 0.4)),
          ("western", "cowboy", "frontier"), ("dusty", "rugged"),
          ("Gunslinger", "Outlaw", "Saloon", "Sheriff", "Canyon", "Ranch", "Stagecoach", "Posse"),
          ("Dusty", "Lone", "Wild", "High"),
          ("cowboys", "bounty hunter", "gold rush", "outlaws", "desert", "cattle drive"),
          ("Out west, the law is whoever draws first.", "A lone rider comes to a town that wants no trouble.")),
)

GENRE_NAMES: tuple[str, ...] = tuple(g.name for g in GENRES)

# Plot keywords in a fixed order (the keyword index used by feature matrices), each with the
# genres it belongs to. A keyword listed by two genres ("desert") belongs to both.
KEYWORDS: tuple[str, ...] = tuple(dict.fromkeys(k for g in GENRES for k in g.keywords))
KEYWORD_GENRES: dict[str, tuple[str, ...]] = {
    k: tuple(g.name for g in GENRES if k in g.keywords) for k in KEYWORDS
}

# Title words not tied to a genre.
GENERIC_NOUNS = (
    "Night", "City", "Road", "Stranger", "Garden", "Mirror", "Storm", "Harbor", "Bridge", "Window", "Winter",
    "Sun", "Moon", "Stone", "Fire", "Water", "Crossing", "Horizon", "Game", "Machine", "Empire", "Tide",
    "Echo", "Dream", "Shadow", "Light", "Station", "Tower", "Hotel", "Train", "Summer", "Ghost", "Line",
    "Circle", "Border", "Escape", "Return", "Run", "Dance", "Song", "House", "Room", "Door", "Voice", "Wolf",
    "Hawk", "Fox", "Lion", "Raven", "Tiger", "Angel", "Devil", "King", "Queen", "Son", "Daughter", "Brother",
    "Sister", "Child", "Witness", "Hunter", "Driver", "Doctor", "Pilot", "Thief", "Sailor", "Painter",
)
GENERIC_ADJECTIVES = (
    "Silent", "Broken", "Golden", "Crimson", "Dark", "Last", "First", "Lonely", "Hidden", "Burning", "Frozen",
    "Wild", "Lost", "Perfect", "Secret", "Endless", "Electric", "Velvet", "Hollow", "Bright", "Little",
    "Long", "Final", "Savage", "Gentle", "Restless", "Scarlet", "Distant", "Sleeping", "Falling",
)
PLACES = (
    "Paris", "Tokyo", "Harlem", "Chicago", "Brooklyn", "Texas", "Alaska", "Rome", "Berlin", "Havana", "Cairo",
    "Memphis", "Vegas", "Manhattan", "Marseille", "Lisbon", "Dublin", "Bangkok", "Shanghai", "Nairobi",
    "Montréal", "Zürich", "São Paulo", "Málaga", "Kraków", "Reykjavík", "Avalon", "Eden", "Mars", "Venus",
)
FIRST_NAMES = (
    "Jack", "Annie", "Harry", "Sally", "Max", "Lola", "Charlie", "Frances", "Oscar", "Ruby", "Leo", "Mia",
    "Sam", "Nora", "Otto", "Grace", "Walter", "Hazel", "Felix", "Iris", "Eddie", "Vera", "Hank", "June",
    "Amélie", "Zoë", "José", "Renée", "Søren", "Inés", "Chloé", "André", "François", "Björn",
)
LAST_NAMES = (
    "Harlow", "Mercer", "Castellano", "Okafor", "Lindqvist", "Brennan", "Takahashi", "Moreau", "Kowalski",
    "Delgado", "Whitaker", "Novak", "Abernathy", "Sato", "Fontaine", "Grady", "Halvorsen", "Iwasaki",
    "Jovanović", "Kaplan", "Larkspur", "McAllister", "Nakamura", "O'Connell", "Petrov", "Quintero",
    "Rasmussen", "Sandoval", "Thibault", "Underwood", "Vasquez", "Wexler", "Yamamoto", "Zielinski",
    "Ashby", "Bellamy", "Carrington", "Dunmore", "Ellison", "Fairbanks", "Galloway", "Holloway", "Ingram",
    "Jarrett", "Kingsley", "Lockhart", "Montague", "Nightingale", "Oakley", "Pemberton", "Radcliffe",
    "Sterling", "Thornton", "Vance", "Winslow", "Yardley", "Åberg", "Núñez", "Dvořák", "Müller",
)
NUMBER_WORDS = ("Two", "Three", "Seven", "Nine", "Twelve", "Forty", "Hundred", "Thousand")
SUBTITLES = (
    "A Love Story", "The Beginning", "Legacy", "Reckoning", "The Final Chapter", "Origins", "Redemption",
    "The Awakening", "Endgame", "Resurrection", "The Lost Years", "A Christmas Story", "Judgment Day",
    "Homecoming", "The Last Stand", "Revelations", "Dead Reckoning", "First Blood", "New Blood", "Uprising",
)
VERBS = ("Look Back", "Say Goodbye", "Go Home", "Wake Up", "Let Go", "Tell Mother", "Stop Now", "Open the Door")
PROTAGONISTS = (
    "a retired detective", "an estranged sister", "a young nurse", "a disgraced pilot", "a small-town teacher",
    "a widowed farmer", "a runaway teenager", "an ambitious lawyer", "a struggling musician", "a former soldier",
    "a shy librarian", "a reckless journalist", "an aging boxer", "a lonely child", "a rookie cop",
    "a single father", "a stubborn scientist", "an exiled prince", "a bored office worker", "a wandering cook",
)
SETTINGS = (
    "a sleepy coastal town", "a crumbling mansion", "the back streets of the city", "a remote research base",
    "a border town", "a crowded tenement", "an island off the coast", "a luxury hotel", "a mining camp",
    "a boarding school", "a country estate", "a night train", "a military outpost", "a suburban cul-de-sac",
)

# Conversation wording. Placeholders: {g} genre phrase, {m} mood, {e} era phrase, {d} director,
# {k} keyword, {k2} second keyword, {a} {b} {c} mentioned films, {x} a genre the user dislikes.
POST_TITLES_GENRE = (
    "Looking for {g} movies{era_from}", "{G} recommendations{era_from}?", "Recommend me a good {g} film",
    "What are your favorite {g} movies{era_from}?", "Help me find some {g} films", "Best {g} movies{era_from}?",
    "Need a {g} movie for tonight", "In the mood for {g}{era_from}",
)
POST_TITLES_SEEN = ("Movies like {a}?", "Just watched {a}, what next?", "Similar films to {a}?",
                    "Anything like {a}?")
POST_TITLES_VAGUE = ("Need something to watch tonight", "Movie night suggestions?", "What should I watch?",
                     "Bored, give me a movie", "Help me pick a film")
BODY_SEEN_1 = ("I just watched {a} and loved it.", "{a} is one of my all-time favorites.",
               "I recently saw {a} and could not stop thinking about it.", "Rewatched {a} last night, still great.")
BODY_SEEN_2 = ("I really liked {a} and {b}.", "Big fan of {a} and {b}.", "Loved {a}, and {b} was great too.")
BODY_SEEN_3 = ("Big fan of {a}, {b} and {c}.", "I have seen {a}, {b} and {c} and enjoyed all of them.",
               "My favorites so far are {a}, {b} and {c}.")
BODY_DIRECTOR = ("Anything by {d} is usually great.", "I've been going through {d}'s filmography.",
                 "Something in the style of {d} would be perfect.", "Huge {d} fan here.")
BODY_KEYWORD_1 = ("Bonus points for {k}.", "I'm really into movies with {k}.", "Something with {k} would be great.")
BODY_KEYWORD_2 = ("Ideally something with {k} and {k2}.", "I love {k} and {k2} in a movie.")
BODY_ERA = ("Preferably from the {e}.", "I love the {e} vibe.", "Something from the {e} would be ideal.",
            "Movies from the {e} are my thing.")
BODY_MOOD = ("I'm in the mood for something {m}.", "Looking for something {m}.", "Give me something {m}.")
BODY_DISLIKE = ("Not really into {x}, though.", "Please no {x}.", "I don't care much for {x}.")
BODY_FILLER = ("Thanks in advance!", "My friends and I do a movie night every Friday.",
               "Streaming or not, doesn't matter.", "Have a great day.", "Any help appreciated.",
               "I've run out of ideas.", "Open to anything really.", "")
SYSTEM_OPENERS = ("Have you seen {a}?", "You might like {a}.", "How about {a}?", "Try {a}.")
SYSTEM_REASONS = ("It has {k}.", "It's a great {g} pick.", "It's a {m} one.", "")
USER_REPLIES = ("Seen it, loved it!", "Already saw that one, it was ok.", "Not yet, adding it to my list.",
                "Yes! That's exactly the kind of thing I mean.")
USER_FOLLOWUPS = ("Any more like that?", "Got any other suggestions?", "What else?", "Anything else?")
