"""Prompt sets shared by the benchmarks and the faithfulness evaluation.

The capital prompts, "The capital of {country} is", come from the ``country-capitals`` package (193 countries by
ISO 3166 alpha-3 code, ``pip install country-capitals``), each country named with pycountry's common name where it
has one (``Bolivia`` rather than ``Bolivia, Plurinational State of``), else its ISO name.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Country", "countries", "capital_prompts", "CAPITAL_TEMPLATE"]

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
