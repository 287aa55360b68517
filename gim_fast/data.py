"""Prompt sets shared by the benchmarks and the evaluations (faithfulness; context attribution).

The capital prompts, "The capital of {country} is", come from the ``country-capitals`` package (193 countries by
ISO 3166 alpha-3 code, ``pip install country-capitals``), each country named with pycountry's common name where it
has one (``Bolivia`` rather than ``Bolivia, Plurinational State of``), else its ISO name.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Country", "countries", "capital_prompts", "CAPITAL_TEMPLATE", "ContextExample", "context_examples",
           "names_capital"]

CAPITAL_TEMPLATE = "The capital of {country} is"


@dataclass(frozen=True)
class Country:
    code: str       # ISO 3166 alpha-3
    name: str       # pycountry's common name, else its ISO name
    capital: str    # as country-capitals spells it

    @property
    def prompt(self) -> str:
        return CAPITAL_TEMPLATE.format(country=self.name)


def countries() -> list[Country]:
    """The 193 countries of ``country-capitals``, sorted by alpha-3 code.

    Raises ModuleNotFoundError (with the pip command) when ``country-capitals`` or ``pycountry`` is missing.
    """
    try:
        import country_capitals
        import pycountry
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"the capital prompts need the packages country-capitals and pycountry ({e}); install them with: "
            "pip install country-capitals pycountry  (or: pip install 'gim-fast[eval]')", name=e.name) from None
    rows = []
    for code in sorted(country_capitals.capitals):
        country = pycountry.countries.get(alpha_3=code)
        name = (getattr(country, "common_name", None) or country.name) if country else code
        rows.append(Country(code, name, country_capitals.capitals[code]))
    return rows


def capital_prompts() -> list[str]:
    """'The capital of {country} is' for the 193 countries of the country-capitals package, by alpha-3 code."""
    return [c.prompt for c in countries()]


# ------------------------------------------------------------------------------------- context attribution

@dataclass(frozen=True)
class ContextExample:
    """A question about one country with a context of short documents: ``sources[gold]`` states the answer."""

    key: str               # the asked country's alpha-3 code
    sources: tuple[str, ...]
    query: str
    gold: int              # the index of the document that states the answer
    answer: str            # the capital, as country-capitals spells it
    country: str           # the asked country's name, as in the query

    def is_answered_by(self, text: str) -> bool:
        """Whether ``text`` (a generated answer) names the capital: see :func:`names_capital`."""
        return names_capital(text, self.answer, self.country)


def names_capital(text: str, capital: str, country: str) -> bool:
    """Whether ``text`` names ``capital`` other than inside a mention of ``country``. When the capital's name is
    part of the country's, every occurrence of the country's name is cut out first, so "Tunis" is not found in
    "Tunisia", nor "Bissau" in "Guinea-Bissau" ("Kuwait City" is looked for as it is). A capital named exactly as
    its country (Luxembourg, Singapore, Monaco, Djibouti) is then never found: a string test cannot tell "The
    capital of Luxembourg is Luxembourg." from "Luxembourg is the capital of the European Union.", so such
    questions are not counted as answered."""
    if capital in country:
        text = text.replace(country, " ")
    return capital in text


def _capital_fact(c: Country) -> str:
    return f"The capital of {c.name} is {c.capital}."


def _code_fact(c: Country) -> str:
    return f"The ISO 3166 code of {c.name} is {c.code}."


def context_examples(documents: int, *, seed: int = 0) -> list[ContextExample]:
    """One example per country (193, in a seeded random order): "What is the capital of {country}?" with a context
    of ``documents`` (≥ 2) one-sentence documents in a seeded random order: the gold one ("The capital of Peru is
    Lima."), a distractor about the same country ("The ISO 3166 code of Peru is PER."), and one fact each about
    ``documents − 2`` other countries, drawn at random, each its capital or its ISO code with probability ½."""
    import random

    if isinstance(documents, bool) or not isinstance(documents, int) or not 2 <= documents <= 194:
        raise ValueError(f"documents must be an integer from 2 to 194 (the other 192 countries give at most one "
                         f"distractor each), got {documents!r}")
    rows = countries()
    order = list(rows)
    random.Random(seed).shuffle(order)
    out = []
    for c in order:
        rng = random.Random(f"{seed}:{documents}:{c.code}")
        others = rng.sample([o for o in rows if o.code != c.code], documents - 2)
        docs = [_capital_fact(c), _code_fact(c)] + [rng.choice((_capital_fact, _code_fact))(o) for o in others]
        place = list(range(documents))
        rng.shuffle(place)
        sources = [""] * documents
        for doc, where in zip(docs, place):
            sources[where] = doc
        out.append(ContextExample(c.code, tuple(sources), f"What is the capital of {c.name}?", place[0], c.capital,
                                  c.name))
    return out
