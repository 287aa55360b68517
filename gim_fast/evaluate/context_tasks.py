"""Written context-attribution tasks that separate methods: multi-hop answers, conflicting and paraphrased
documents, many documents, long documents — generated from word lists written here (no download).

Every example is a question about fictional people, companies and towns (a small model cannot know the answers,
so they must come from the context), a context of documents and a **fixed answer**: a sentence stating the
value the documents support (``response``; e.g. "Nadia Brandt keeps a ferret as a pet."). ContextCite's metrics are model-relative, so the fixed answer is attributed whether or not the model
would generate it (as ContextCite's own evaluation attributes a given response).

=============  =====================================================================================================
``entities``   8 one-sentence documents about people: the one stating the asked fact (gold), one or two others
               about the same person (distractors), the rest about other people with the same relations
``multihop``   10 documents; the answer needs two: "P works for O." and "O has its headquarters in C." (gold:
               the second, which names the answer); distractors: P's birthplace (another town), other people's
               employers and other companies' towns
``conflict``   10 documents: the fact (gold), a paraphrase of it, a document stating a different value, and
               distractors — redundancy (removing one of gold and paraphrase barely matters while the other stays)
               and a source that lowers the answer's probability
``many``       ``entities`` with 20 to 50 documents (32 by default)
``long``       6 long documents (profiles of about 25 sentences each, 2 000 to 3 000 prompt tokens in all with
               SmolLM2's tokenizer), the asked fact inside one of them, a conflicting value for the same relation
               inside another person's profile
=============  =====================================================================================================

Two disjoint banks of names, towns, companies and sentence templates: ``split="dev"`` (the one methods may be
tuned on) and ``split="heldout"`` (kept apart: nothing is tuned on it). Examples are drawn from a seeded
``random.Random``; the same (task, split, seed, index) always gives the same example.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["TaskExample", "TASKS", "SPLITS", "task_examples", "DEFAULT_TASK_DOCUMENTS"]

SPLITS = ("dev", "heldout")
TASKS = ("entities", "multihop", "conflict", "many", "long")
DEFAULT_TASK_DOCUMENTS = {"entities": 8, "multihop": 10, "conflict": 10, "many": 32, "long": 6}


@dataclass(frozen=True)
class TaskExample:
    """One question: ``sources[gold]`` names the answer; ``needed`` are every document the answer rests on (the
    gold one and, for multi-hop, the bridge; for ``conflict``, the paraphrase too); ``against`` the documents that
    state a different value."""

    key: str
    task: str
    sources: tuple[str, ...]
    query: str
    answer: str                  # the value the question asks for
    response: str                # the fixed answer that is attributed: a sentence stating the value
    gold: int
    needed: tuple[int, ...]
    against: tuple[int, ...] = ()

    def is_answered_by(self, text: str) -> bool:
        return self.answer in text


# --------------------------------------------------------------------------------------------- the word banks

_BANKS = {
    "dev": {
        "first": ["Arlen", "Bryn", "Corin", "Dara", "Elio", "Fenna", "Gideon", "Hestia", "Ivo", "Juno", "Kael",
                  "Liora", "Milo", "Nadia", "Orrin", "Pella", "Quinn", "Rhea", "Silas", "Tamsin", "Ulric", "Vesna",
                  "Wren", "Xavi", "Yara", "Zeno"],
        "last": ["Voss", "Calder", "Maddox", "Quill", "Brandt", "Holt", "Parr", "Lorne", "Farrow", "Denby", "Grange",
                 "Rusk", "Vale", "Stroud", "Ashby", "Kestrel", "Morrow", "Penhale", "Thorne", "Wick"],
        "town": ["Velmora", "Tarsk", "Quendal", "Brisport", "Oakhaven", "Luvrin", "Caldmere", "Dunwick", "Estrava",
                 "Fallowby", "Grisholm", "Harrowgate", "Istria", "Jorvale", "Kelmarsh", "Lindqvist", "Marrowby",
                 "Norhaven", "Orlesk", "Pellington", "Quarrow", "Rosmere", "Saltren", "Tovington"],
        "company": ["Halvex Labs", "Norvane Shipping", "Pyxis Foods", "Brightwater Mills", "Ostrel Motors",
                    "Corvid Systems", "Lumen & Ash", "Ferrowind Energy", "Gannet Textiles", "Hollis Bank",
                    "Ironleaf Press", "Juniper Optics", "Kestor Pharma", "Marlowe Freight", "Nimbus Tiles",
                    "Orbis Paints"],
        "instrument": ["cello", "oboe", "banjo", "harp", "trumpet", "accordion", "clarinet", "marimba", "sitar",
                       "bassoon"],
        "animal": ["parrot", "tortoise", "ferret", "goat", "iguana", "hedgehog", "donkey", "goldfish"],
        "relations": {
            "born": ("{p} was born in {v}.", "Where was {p} born?", "town",
                     "{v} is the town where {p} was born."),
            "instrument": ("{p} plays the {v}.", "Which instrument does {p} play?", "instrument",
                           "The instrument {p} plays is the {v}."),
            "pet": ("{p} keeps a {v} as a pet.", "Which animal does {p} keep as a pet?", "animal",
                    "The pet that {p} keeps is a {v}."),
        },
        "works": "{p} works for {o}.",
        "hq": "{o} has its headquarters in {v}.",
        "hop_query": "In which town is the headquarters of the company that {p} works for?",
        "hop_answer": "The company that {p} works for has its headquarters in {v}.",
        "filler": ["{p} likes long walks along the river on Sunday mornings.",
                   "{p} once spent a whole summer repairing an old sailing boat.",
                   "Friends describe {p} as patient, curious and a little stubborn.",
                   "{p} reads two or three novels every month, mostly detective stories.",
                   "On weekdays {p} usually gets up before six and makes strong coffee.",
                   "{p} has a small garden with tomatoes, beans and a crooked apple tree.",
                   "As a child, {p} collected stamps from countries that no longer exist.",
                   "{p} prefers trains to planes and avoids driving in cities.",
                   "Every winter {p} knits scarves for the neighbours' children.",
                   "{p} keeps a diary and has written in it almost every day for years.",
                   "{p} speaks three languages and is learning a fourth one slowly.",
                   "{p} volunteers at the local library on the first Saturday of each month.",
                   "In the evenings {p} often cooks soup for the whole family.",
                   "{p} dislikes loud music but enjoys old folk songs.",
                   "A few years ago {p} ran a half marathon and finished in the middle of the field.",
                   "{p} owns a bicycle that is older than most of the neighbours' cars.",
                   "{p} has never missed the town's autumn fair.",
                   "The walls of {p}'s kitchen are covered with maps and postcards.",
                   "{p} enjoys chess and plays a game by mail with a cousin abroad.",
                   "When it rains, {p} likes to sit by the window with a cup of tea."],
    },
    "heldout": {
        "first": ["Anouk", "Bastian", "Cleo", "Dorian", "Esme", "Florin", "Greta", "Hugo", "Ilse", "Jasper", "Katja",
                  "Lucan", "Maren", "Nils", "Odile", "Piet", "Rosalind", "Soren", "Thea", "Urs", "Valentin", "Wilma"],
        "last": ["Achterberg", "Bellweather", "Cromwell", "Dunmore", "Eskildsen", "Fairbanks", "Gallo", "Hemsworth",
                 "Iverson", "Jablonski", "Kingsley", "Lindgren", "Montague", "Novak", "Okafor", "Pryce", "Radley",
                 "Sandoval"],
        "town": ["Zarnow", "Yellowmere", "Wexcombe", "Vintra", "Ulverby", "Tollmarsh", "Skarvik", "Ronsdale",
                 "Pimbury", "Ostergaard", "Nethercott", "Mirelle", "Lowestry", "Kirrin", "Jadeport", "Hollin Cross",
                 "Gelmark", "Fenbridge", "Eldmoor", "Draycott", "Carrowmore", "Bexley Vale"],
        "company": ["Quarry Bell Ltd", "Sable & Finch", "Tidewell Group", "Umbra Robotics", "Vantor Glass",
                    "Wexley Insurance", "Yarrow Seeds", "Zephyr Airlines", "Amberline Toys", "Birchall Steel",
                    "Cobalt Harbour", "Driftwood Media", "Emberly Coffee", "Foxglove Health"],
        "sport": ["fencing", "curling", "rowing", "archery", "badminton", "handball", "judo", "polo", "squash"],
        "drink": ["lemonade", "cider", "cocoa", "buttermilk", "ginger beer", "green tea", "espresso", "kefir"],
        "relations": {
            "hometown": ("{p} grew up in the town of {v}.", "In which town did {p} grow up?", "town",
                         "The town of {v} is where {p} grew up."),
            "sport": ("{p}'s favourite sport is {v}.", "What is {p}'s favourite sport?", "sport",
                      "Of all sports, {p} likes {v} best."),
            "drink": ("{p} drinks {v} every morning.", "What does {p} drink every morning?", "drink",
                      "Every morning, {v} is what {p} drinks."),
        },
        "works": "{p} is employed by {o}.",
        "hq": "The main office of {o} is located in {v}.",
        "hop_query": "In which town is the main office of {p}'s employer located?",
        "hop_answer": "The main office of {p}'s employer is located in {v}.",
        "filler": ["{p} spends most weekends hiking in the hills north of town.",
                   "{p} restores old radios in a workshop behind the house.",
                   "Colleagues say {p} is the calmest person in any meeting.",
                   "{p} bakes bread every Friday and gives half of it away.",
                   "{p} learned to swim late, at the age of thirty.",
                   "{p} has a collection of more than two hundred records.",
                   "Most evenings {p} walks the neighbour's dog around the park.",
                   "{p} writes letters by hand and rarely uses the telephone.",
                   "{p} grows herbs on every windowsill of the flat.",
                   "Once a year {p} takes a long trip by ferry to the islands.",
                   "{p} is afraid of heights but loves lighthouses.",
                   "{p} sings in a small choir that meets on Tuesday nights.",
                   "{p} repaired the roof of the garden shed last spring.",
                   "{p} keeps every ticket from every concert ever attended.",
                   "Neighbours often ask {p} for advice about their gardens.",
                   "{p} can solve a crossword puzzle in under ten minutes.",
                   "{p} paints watercolours of boats in the harbour.",
                   "{p} prefers the quiet of early mornings to busy evenings.",
                   "{p} once met a famous actor on a delayed train.",
                   "{p} has been saving for years to buy a small cottage."],
    },
}


def _bank(split: str) -> dict:
    if split not in _BANKS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return _BANKS[split]


def _people(rng: random.Random, bank: dict, count: int) -> list[str]:
    """``count`` different people; the first (the one asked about) shares neither first nor last name with any
    other, so the question names exactly one of them."""
    names = [f"{f} {l}" for f in bank["first"] for l in bank["last"]]
    asked = rng.choice(names)
    first, last = asked.split(" ", 1)
    others = [n for n in names if not n.startswith(first + " ") and not n.endswith(" " + last)]
    return [asked, *rng.sample(others, count - 1)]


def _values(bank: dict, kind: str) -> list[str]:
    return bank[kind]


def _shuffled(rng: random.Random, docs: list[str]) -> tuple[tuple[str, ...], list[int]]:
    """The documents in a random order and where each of the given ones went."""
    place = list(range(len(docs)))
    rng.shuffle(place)
    out = [""] * len(docs)
    for doc, where in zip(docs, place):
        out[where] = doc
    return tuple(out), place


def _fact(bank, relation, person, value) -> str:
    return bank["relations"][relation][0].format(p=person, v=value)


def _entities(rng, bank, documents, key, task) -> TaskExample:
    relations = list(bank["relations"])
    people = _people(rng, bank, documents)
    asked, relation = people[0], rng.choice(relations)
    template, query, kind, _ = bank["relations"][relation]
    answer = rng.choice(_values(bank, kind))
    docs = [template.format(p=asked, v=answer)]
    # one or two distractors about the asked person (other relations)
    for other in rng.sample([r for r in relations if r != relation], rng.choice((1, 2))):
        docs.append(_fact(bank, other, asked, rng.choice(_values(bank, bank["relations"][other][2]))))
    for person in people[1:]:
        if len(docs) == documents:
            break
        r = rng.choice(relations)
        value_kind = bank["relations"][r][2]
        choices = [v for v in _values(bank, value_kind) if v != answer]
        docs.append(_fact(bank, r, person, rng.choice(choices)))
    sources, place = _shuffled(rng, docs[:documents])
    return TaskExample(key, task, sources, query.format(p=asked), answer, docs[0], place[0], (place[0],))


def _multihop(rng, bank, documents, key) -> TaskExample:
    people = _people(rng, bank, documents)
    companies = rng.sample(bank["company"], 4)
    towns = rng.sample(bank["town"], 6)
    asked, answer = people[0], towns[0]
    born = next(r for r, v in bank["relations"].items() if v[2] == "town")
    docs = [bank["hq"].format(o=companies[0], v=answer),                     # gold: names the answer
            bank["works"].format(p=asked, o=companies[0]),                    # the bridge
            _fact(bank, born, asked, towns[1])]                               # the asked person's own town
    for i, company in enumerate(companies[1:], 2):                            # other companies' towns
        docs.append(bank["hq"].format(o=company, v=towns[i]))
    people_left = people[1:]
    while len(docs) < documents and people_left:                             # other people's employers
        docs.append(bank["works"].format(p=people_left.pop(), o=rng.choice(companies[1:])))
    sources, place = _shuffled(rng, docs[:documents])
    return TaskExample(key, "multihop", sources, bank["hop_query"].format(p=asked), answer,
                       bank["hop_answer"].format(p=asked, v=answer), place[0], (place[0], place[1]))


def _conflict(rng, bank, documents, key) -> TaskExample:
    relations = list(bank["relations"])
    people = _people(rng, bank, documents)
    asked, relation = people[0], rng.choice(relations)
    template, query, kind, paraphrase = bank["relations"][relation]
    answer, other = rng.sample(_values(bank, kind), 2)
    docs = [template.format(p=asked, v=answer), paraphrase.format(p=asked, v=answer),
            template.format(p=asked, v=other)]
    for person in people[1:]:
        if len(docs) == documents:
            break
        r = rng.choice(relations)
        docs.append(_fact(bank, r, person, rng.choice(_values(bank, bank["relations"][r][2]))))
    sources, place = _shuffled(rng, docs[:documents])
    return TaskExample(key, "conflict", sources, query.format(p=asked), answer, docs[0], place[0],
                       (place[0], place[1]), (place[2],))


def _long(rng, bank, documents, key, sentences: int = 24) -> TaskExample:
    relations = list(bank["relations"])
    people = _people(rng, bank, documents)
    asked, relation = people[0], rng.choice(relations)
    template, query, kind, _ = bank["relations"][relation]
    answer, other = rng.sample(_values(bank, kind), 2)
    profiles = []
    for i, person in enumerate(people):
        lines = [f.format(p=person) for f in rng.sample(bank["filler"], sentences - len(relations) - 1)]
        facts = []
        for r in relations:
            value = rng.choice(_values(bank, bank["relations"][r][2]))
            if r == relation:
                value = answer if i == 0 else other if i == 1 else rng.choice(
                    [v for v in _values(bank, kind) if v != answer])
            facts.append(_fact(bank, r, person, value))
        facts.append(bank["works"].format(p=person, o=rng.choice(bank["company"])))
        for fact in facts:          # the facts at random places among the filler
            lines.insert(rng.randrange(len(lines) + 1), fact)
        profiles.append(" ".join(lines))
    sources, place = _shuffled(rng, profiles)
    return TaskExample(key, "long", sources, query.format(p=asked), answer, template.format(p=asked, v=answer),
                       place[0], (place[0],), (place[1],))


def task_examples(task: str, count: int, *, split: str = "dev", seed: int = 0,
                  documents: int | None = None) -> list[TaskExample]:
    """``count`` examples of ``task`` (one of :data:`TASKS`) from the ``split`` bank. ``documents``: how many
    documents per example (default :data:`DEFAULT_TASK_DOCUMENTS`; ``many`` takes 20 to 50)."""
    if task not in TASKS:
        raise ValueError(f"unknown context task {task!r}; accepted: {', '.join(TASKS)}")
    bank = _bank(split)
    documents = DEFAULT_TASK_DOCUMENTS[task] if documents is None else documents
    low = {"entities": 4, "multihop": 7, "conflict": 5, "many": 20, "long": 2}[task]
    high = {"many": 50}.get(task, 20)
    if isinstance(documents, bool) or not isinstance(documents, int) or not low <= documents <= high:
        raise ValueError(f"{task}: documents must be an integer from {low} to {high}, got {documents!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    out = []
    for i in range(count):
        rng = random.Random(f"{task}:{split}:{seed}:{documents}:{i}")
        key = f"{task}-{split}-{seed}-{i}"
        if task in ("entities", "many"):
            out.append(_entities(rng, bank, documents, key, task))
        elif task == "multihop":
            out.append(_multihop(rng, bank, documents, key))
        elif task == "conflict":
            out.append(_conflict(rng, bank, documents, key))
        else:
            out.append(_long(rng, bank, documents, key))
    return out
