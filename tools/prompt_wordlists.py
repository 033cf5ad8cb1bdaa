"""Word lists and phrases for tools/make_prompt_set.py, written for this project.

Plain data: changing a list changes the generated files (rerun the generator and commit both).
"""

from __future__ import annotations


def _pairs(text: str, sep: str = ":") -> list[tuple[str, str]]:
    return [tuple(part.strip() for part in item.split(sep)) for item in text.split("|")]


def _words(text: str) -> list[str]:
    return [item.strip() for item in text.split("|")]


# ---------------------------------------------------------------- people and things
_NAMES = (
    "Anna:she|Ben:he|Chloe:she|David:he|Emma:she|Farid:he|Grace:she|Hugo:he|Ines:she|Jamal:he|"
    "Keiko:she|Liam:he|Maya:she|Noah:he|Olivia:she|Pedro:he|Quinn:she|Ravi:he|Sara:she|Tom:he|"
    "Uma:she|Victor:he|Wen:she|Yusuf:he|Zoe:she|Lena:she|Omar:he|Priya:she|Sam:he|Tara:she"
)
PRONOUN = dict(_pairs(_NAMES))
NAMES = list(PRONOUN)
COUNTABLE = _words(
    "apples|marbles|stickers|pencils|books|oranges|stamps|shells|coins|cards|balloons|cookies|"
    "eggs|flowers|toy cars|beads|crayons|buttons|candles|lemons"
)
CONTAINERS = _words("boxes|bags|baskets|jars|crates|trays|drawers|bowls")
VEHICLES = _words("car|train|bus|truck|boat|bicycle courier|van|tram")
SHOP_ITEMS = _words("notebook|pen|mug|sandwich|ticket|plant|scarf|toy|candle|poster|cap|lamp")
WEEKDAYS = _words("Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday")
BAKED = _words("cookies|muffins|cupcakes|rolls|pancakes|biscuits")
MATH_SUFFIXES = [
    "",
    "",
    " Explain your reasoning step by step.",
    " Give the final answer as a number.",
    " Show your work.",
    " Answer briefly.",
]

# ---------------------------------------------------------------- facts
CAPITALS = _pairs(
    "France:Paris|Germany:Berlin|Japan:Tokyo|Spain:Madrid|the United Kingdom:London|"
    "Russia:Moscow|China:Beijing|Egypt:Cairo|Canada:Ottawa|Italy:Rome|Greece:Athens|"
    "Portugal:Lisbon|Ireland:Dublin|Norway:Oslo|Austria:Vienna|Poland:Warsaw|Sweden:Stockholm|"
    "Finland:Helsinki|Denmark:Copenhagen|Hungary:Budapest|Belgium:Brussels|"
    "the Netherlands:Amsterdam|Thailand:Bangkok|South Korea:Seoul|Argentina:Buenos Aires|"
    "Peru:Lima|Chile:Santiago|Mexico:Mexico City|Kenya:Nairobi|Cuba:Havana|Iran:Tehran|"
    "Indonesia:Jakarta|the Philippines:Manila|Vietnam:Hanoi|Turkey:Ankara|India:New Delhi|"
    "Australia:Canberra|Brazil:Brasilia|Switzerland:Bern|Czechia:Prague|Colombia:Bogota|"
    "Morocco:Rabat|Nigeria:Abuja|Ethiopia:Addis Ababa|Iceland:Reykjavik|New Zealand:Wellington"
)
COUNTRY_CONTINENT = _pairs(
    "France:Europe|Japan:Asia|Brazil:South America|Kenya:Africa|Canada:North America|"
    "Australia:Oceania|Egypt:Africa|India:Asia|Peru:South America|Mexico:North America|"
    "Norway:Europe|Vietnam:Asia|Nigeria:Africa|Chile:South America|Italy:Europe|"
    "Thailand:Asia|Morocco:Africa|Argentina:South America|Poland:Europe|Mongolia:Asia|"
    "Ghana:Africa|Cuba:North America|Portugal:Europe|Nepal:Asia|Colombia:South America"
)
ELEMENTS = _pairs(
    "gold:Au|silver:Ag|iron:Fe|oxygen:O|hydrogen:H|carbon:C|sodium:Na|potassium:K|copper:Cu|"
    "helium:He|nitrogen:N|calcium:Ca|lead:Pb|tin:Sn|zinc:Zn|neon:Ne|sulfur:S|mercury:Hg"
)
ANIMALS = _words(
    "elephant|penguin|dolphin|owl|giraffe|kangaroo|octopus|honeybee|wolf|tortoise|camel|"
    "parrot|salmon|bat|koala|cheetah|frog|whale|ant|rabbit|horse|crow|shark|panda|beaver|"
    "hedgehog|lion|zebra|seal|eagle|snail|squid|moose|otter|hamster"
)
ANIMAL_QUESTIONS = [
    "What does a {animal} eat?",
    "Where does a {animal} live?",
    "Describe a {animal} in one sentence.",
    "How long does a {animal} usually live?",
    "What is special about the {animal}?",
    "How does a {animal} sleep?",
    "Is a {animal} a mammal? Explain briefly.",
]
SCIENCE_WHY = _words(
    "Why is the sky blue?|Why do leaves change colour in autumn?|Why does ice float on water?|"
    "Why do we have seasons?|Why does the Moon change shape?|Why do cats purr?|"
    "Why is the sea salty?|Why do we need to sleep?|Why does bread rise?|"
    "Why do stars twinkle?|Why does metal feel colder than wood?|Why do onions make people cry?|"
    "Why do birds migrate?|Why is exercise good for the heart?|How do rainbows form?|"
    "How do plants make food?|How does a magnet work?|How do vaccines work?|"
    "How does the heart pump blood?|How are clouds formed?|What causes thunder?|"
    "What causes earthquakes?|What causes the tides?|How do bees make honey?|"
    "How does a refrigerator keep food cold?|Why do we see lightning before we hear thunder?"
)
TERMS = _words(
    "photosynthesis|gravity|an atom|democracy|inflation|a volcano|evaporation|an ecosystem|"
    "a prime number|a fraction|electricity|the internet|a black hole|recycling|a budget|"
    "climate|friction|a vaccine|a noun|a verb|a metaphor|a triangle|an algorithm|a database|"
    "compound interest|a galaxy|erosion|a continent|an election|a symphony|a habitat|"
    "a molecule|an orbit|a tsunami|a glacier|a mammal|a reptile|a planet|a democracy|a tax|"
    "a loan|an invoice|a poem|a novel|a sonnet|a river delta|a desert|a rainforest|a fossil|"
    "an eclipse|a circuit|a battery|a password|an email|a spreadsheet|a website|a percentage|"
    "an angle|a square root"
)
UNIT_FACTS = [
    ("a week", "days", "7"),
    ("a year", "months", "12"),
    ("a day", "hours", "24"),
    ("an hour", "minutes", "60"),
    ("a minute", "seconds", "60"),
    ("a kilometre", "metres", "1000"),
    ("a metre", "centimetres", "100"),
    ("a kilogram", "grams", "1000"),
    ("a dozen", "items", "12"),
    ("a century", "years", "100"),
    ("a decade", "years", "10"),
    ("a litre", "millilitres", "1000"),
]


def plural_unit(unit: str) -> str:
    """'a week' -> 'weeks', 'an hour' -> 'hours', 'a century' -> 'centuries'."""
    word = unit.split(" ", 1)[1]
    return word[:-1] + "ies" if word.endswith("y") and word != "day" else word + "s"


LANDMARKS = _pairs(
    "the Eiffel Tower:France|the Colosseum:Italy|the Great Wall:China|the Taj Mahal:India|"
    "Machu Picchu:Peru|the Statue of Liberty:the United States|Big Ben:the United Kingdom|"
    "the Sydney Opera House:Australia|the pyramids of Giza:Egypt|Mount Fuji:Japan|"
    "the Acropolis:Greece|the Sagrada Familia:Spain|Christ the Redeemer:Brazil|"
    "the Brandenburg Gate:Germany|Table Mountain:South Africa|Niagara Falls:Canada|"
    "Angkor Wat:Cambodia|Petra:Jordan|the Kremlin:Russia|Chichen Itza:Mexico"
)
INVENTIONS = _pairs(
    "telephone:Alexander Graham Bell|light bulb:Thomas Edison|printing press:Johannes Gutenberg|"
    "World Wide Web:Tim Berners-Lee|aeroplane:the Wright brothers|radio:Guglielmo Marconi|"
    "steam engine:James Watt|dynamite:Alfred Nobel|penicillin:Alexander Fleming"
)

# ---------------------------------------------------------------- code
LANGUAGES = _words("Python|Python|Python|JavaScript|C|Rust|Go|Java|C++|TypeScript")
CODE_TASKS = _words(
    "reverses a string|checks whether a number is prime|returns the largest element of a list|"
    "counts the vowels in a string|computes the factorial of n|returns the n-th Fibonacci number|"
    "sorts a list of numbers with bubble sort|removes duplicates from a list|"
    "checks whether a string is a palindrome|converts Celsius to Fahrenheit|"
    "merges two sorted lists into one sorted list|computes the sum of the digits of an integer|"
    "finds the greatest common divisor of two integers|counts the words in a sentence|"
    "returns the second smallest number in a list|checks whether two strings are anagrams|"
    "computes the average of a list of numbers|converts a binary string to an integer|"
    "capitalises the first letter of every word|returns the even numbers of a list|"
    "finds the index of an element with binary search|flattens a nested list|"
    "counts how often each character appears in a string|checks whether a year is a leap year|"
    "returns the median of a list|rotates a list by k positions|"
    "computes the dot product of two vectors|transposes a matrix|"
    "returns the longest word in a sentence|checks whether brackets in a string are balanced"
)
CODE_CONCEPT_PAIRS = [
    ("a list", "a tuple"),
    ("a class", "an object"),
    ("a function", "a method"),
    ("a stack", "a queue"),
    ("an array", "a linked list"),
    ("recursion", "iteration"),
    ("a compiler", "an interpreter"),
    ("a variable", "a constant"),
    ("a loop", "a condition"),
    ("pass by value", "pass by reference"),
    ("a process", "a thread"),
    ("a set", "a map"),
]
CODE_HOWTO = _words(
    "read a file line by line|sort a dictionary by value|measure how long a function takes|"
    "parse a JSON string|handle an exception|write a unit test|reverse a list|"
    "split a string by commas|format a number with two decimals|get the current date|"
    "generate a random number|remove whitespace from a string|check if a key exists in a map|"
    "iterate over two lists at once|convert a string to an integer"
)

# ---------------------------------------------------------------- chat
TOPICS = _words(
    "the sea|autumn|a rainy day|friendship|the moon|a busy city|a quiet library|mountains|"
    "coffee|the first day of school|a garden in spring|an old clock|trains|the desert at night|"
    "cats|music|a thunderstorm|snow|the stars|a lighthouse|bicycles|the ocean floor|bread"
)
ACTIVITIES = _words(
    "staying focused while studying|sleeping better|learning a new language|saving money|"
    "keeping a plant alive|running a first 5 km|cooking on a budget|writing clearly|"
    "making new friends in a new city|staying calm before an exam|organising a small desk|"
    "drinking more water|reading more books|preparing for a job interview|travelling light"
)
ADJECTIVES = _words("brave|curious|sleepy|tiny|clumsy|kind|lonely|clever|grumpy|cheerful")
CREATURES = _words("dragon|robot|mouse|fox|penguin|snail|giant|owl|turtle|ghost|squirrel")
DEEDS = _words(
    "learns to swim|loses its way home|finds a hidden door|wants to touch the clouds|"
    "opens a small bakery|is afraid of the dark|makes an unlikely friend|plants a tree|"
    "builds a boat|forgets its own birthday|wins a race by accident"
)
PLACES = _words(
    "a busy market|a beach at sunrise|a forest after rain|an old train station|a mountain village|"
    "a school playground|a night sky in the countryside|a small harbour|a kitchen at breakfast"
)
PEOPLE = _words("a neighbour|a teacher|a cousin|a new colleague|an old friend|a landlord")
EMAIL_SUBJECTS = _words(
    "a weekend picnic|borrowing a ladder|a change of plans|a birthday party|thanks for the help|"
    "a book recommendation|a noisy evening|a shared garden"
)
AUDIENCES = _words("a five-year-old|a beginner|a grandparent|a busy manager|a high-school student")
GOALS = _words(
    "reduce stress|learn to draw|use less plastic|get up earlier|remember names|"
    "spend less time on the phone|eat more vegetables|be more productive in the morning"
)
INFORMAL_SENTENCES = _words(
    "hey, can u send me the file asap?|this movie was kinda boring tbh.|"
    "we gotta finish this by friday.|thx for the help yesterday!|i dunno where the keys are.|"
    "the meeting got moved, fyi.|that idea is super cool.|gimme a sec, i'm almost done."
)

# ---------------------------------------------------------------- QA set (short answers)
# Item types kept are those SmolLM2-135M-Instruct answers well (see bundled/README.md); arithmetic,
# colours of things, next-in-sequence, days/months, feminine forms and baby animals were tried and
# dropped (teacher accuracy 0-60%). "a:b/c" gives answer b with alias c.
QA_CAPITALS = _pairs(
    "France:Paris|Germany:Berlin|Japan:Tokyo|Spain:Madrid|the United Kingdom:London|"
    "Russia:Moscow|China:Beijing|Egypt:Cairo|Canada:Ottawa|Italy:Rome|Greece:Athens|"
    "Portugal:Lisbon|Ireland:Dublin|Norway:Oslo|Austria:Vienna|Poland:Warsaw|Sweden:Stockholm|"
    "Finland:Helsinki|Denmark:Copenhagen|Hungary:Budapest|Belgium:Brussels|"
    "the Netherlands:Amsterdam|Thailand:Bangkok|South Korea:Seoul|Argentina:Buenos Aires|"
    "Peru:Lima|Chile:Santiago|Mexico:Mexico City|Kenya:Nairobi|Cuba:Havana|Iran:Tehran|"
    "Iraq:Baghdad|Indonesia:Jakarta|the Philippines:Manila|Vietnam:Hanoi|Turkey:Ankara|"
    "India:New Delhi|Australia:Canberra|Brazil:Brasilia|the United States:Washington"
)
QA_ANTONYMS = _pairs(
    "hot:cold|big:small/little|up:down|fast:slow|happy:sad/unhappy|day:night|wet:dry|tall:short|"
    "full:empty|early:late|hard:soft/easy|black:white|open:closed/shut|old:young/new|long:short|"
    "high:low|heavy:light|thick:thin|strong:weak|loud:quiet/soft|clean:dirty|cheap:expensive|"
    "easy:difficult/hard|true:false|left:right|push:pull|inside:outside|before:after|"
    "good:bad/evil|love:hate|buy:sell|give:take/receive|north:south|east:west|remember:forget|"
    "start:finish/stop/end|sweet:sour/bitter|ancient:modern|friend:enemy|alive:dead|"
    "always:never|win:lose/loss|light:dark/darkness|rich:poor|first:last|arrive:leave/depart|"
    "new:old|front:back|accept:reject|asleep:awake"
)
QA_PLURALS = _pairs(
    "cat:cats|dog:dogs|box:boxes|child:children|mouse:mice|book:books|foot:feet|tooth:teeth|"
    "man:men|woman:women|goose:geese|person:people|bus:buses|baby:babies|city:cities|leaf:leaves|"
    "knife:knives|wolf:wolves|potato:potatoes|tomato:tomatoes|church:churches|glass:glasses|"
    "car:cars|tree:trees|bird:birds|horse:horses|apple:apples|house:houses|story:stories|"
    "wife:wives|life:lives|hero:heroes|fox:foxes|dish:dishes|key:keys"
)
QA_LETTER_WORDS = _words(
    "apple|banana|house|zebra|river|mountain|garden|window|table|pencil|orange|yellow|kitchen|"
    "dragon|island|jacket|lemon|monkey|number|ocean|planet|quiet|rabbit|sugar|tiger|umbrella|"
    "violin|water|forest|guitar"
)
QA_LANGUAGES = _pairs(
    "France:French|Germany:German|Spain:Spanish|Italy:Italian|Japan:Japanese|China:Chinese/Mandarin|"
    "Russia:Russian|Portugal:Portuguese|Greece:Greek|Sweden:Swedish|Brazil:Portuguese|"
    "Mexico:Spanish|Argentina:Spanish|the Netherlands:Dutch|Poland:Polish|Turkey:Turkish|"
    "Egypt:Arabic|Iran:Persian/Farsi|South Korea:Korean|Thailand:Thai|Vietnam:Vietnamese|"
    "Finland:Finnish|Norway:Norwegian|Denmark:Danish|Hungary:Hungarian|Ukraine:Ukrainian|"
    "Israel:Hebrew|Austria:German|Chile:Spanish|Indonesia:Indonesian"
)
QA_CURRENCIES = _pairs(
    "Japan:yen|the United Kingdom:pound|the United States:dollar|India:rupee|Russia:ruble/rouble|"
    "China:yuan/renminbi|Mexico:peso|Switzerland:franc|South Korea:won|Thailand:baht|"
    "Brazil:real|South Africa:rand|Sweden:krona|Poland:zloty|Turkey:lira|Canada:dollar|"
    "Australia:dollar|Egypt:pound|Israel:shekel|Vietnam:dong|Germany:euro|France:euro"
)
QA_HALVES = [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 24, 30, 40, 50, 60, 80, 100, 200, 1000]
