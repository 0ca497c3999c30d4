"""Errors that reach the user. A UserInputError becomes exit code 2 and a one-paragraph message."""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user: a file, a data row or a recipe key, and what to do about it.

    `where` names the place ("data.jsonl line 12", "recipe key train.lr"); `hint` says what to do.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  what to do: {self.hint}"
        return text
