"""The store's string escaping: the driver's output, faster."""

from __future__ import annotations

import random

import aiomysql
from pymysql.converters import escape_string as pymysql_escape_string

from worker.store.db import escape_string


def test_every_character_is_escaped_as_pymysql_escapes_it() -> None:
    every = "".join(chr(code) for code in range(0x110000))
    assert escape_string(every) == pymysql_escape_string(every)
    for code in range(0x110000):
        char = chr(code)
        assert escape_string(char) == pymysql_escape_string(char), hex(code)


def test_strings_mixing_what_is_escaped_come_out_as_pymysql_writes_them() -> None:
    rng = random.Random(19)
    alphabet = "\\\0\n\r\x1a'\"aZ0 é😀%_"
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert escape_string(text) == pymysql_escape_string(text), repr(text)


def test_the_driver_escapes_its_parameters_with_it() -> None:
    assert aiomysql.connection.escape_string is escape_string
