"""Markdown output shared by the report's sections (a leaf module: the sections import it, not each other)."""

from __future__ import annotations


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub Markdown table: ``header`` cells, then one row per ``body`` entry."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


__all__ = ["markdown_table"]
