"""One phone identity: how a person, a file and Meta write a number, and the forms of one mobile
that WhatsApp's `wa_id` and the queue disagree on."""

from __future__ import annotations

import pytest

from worker.messages import InvalidMessage, parse_phone, phone_variants


@pytest.mark.parametrize(
    ("raw", "country", "phone"),
    [
        ("+51 987-654-321", None, "+51987654321"),  # PE, as a person writes it
        ("987654321", "PE", "+51987654321"),  # as agents type a Peruvian mobile
        ("51987654321", None, "+51987654321"),  # Meta's form: the country code without the +
        ("51987654321", "PE", "+51987654321"),  # not national for PE: read with its country code
        ("0051987654321", None, "+51987654321"),
        ("55 1234 5678", "MX", "+525512345678"),
        ("3001234567", "CO", "+573001234567"),
        ("612 345 678", "ES", "+34612345678"),
        ("(202) 555-0123", "US", "+12025550123"),
        ("11 98765-4321", "BR", "+5511987654321"),
        ("9 11 2345-6789", "AR", "+5491123456789"),
        ("5215512345678", None, "+5215512345678"),  # Meta's wa_id of a Mexican mobile, kept as given
    ],
)
def test_a_phone_is_read_as_its_writer_meant_it(raw: str, country: str | None, phone: str) -> None:
    assert parse_phone(raw, country) == phone


@pytest.mark.parametrize(
    ("raw", "country"),
    [
        ("987654321", None),
        ("12", "PE"),
        ("not-a-phone", "PE"),
        ("4987654321", "PE"),  # a mistyped Peruvian number is not a German one
        ("15512345678", "MX"),  # nor a Mexican one a North American one
        ("2612345678", "ES"),  # nor a Spanish one a Malagasy one
    ],
)
def test_a_phone_valid_nowhere_is_an_error_never_another_country(raw: str, country: str | None) -> None:
    with pytest.raises(InvalidMessage, match=r"is not in E\.164 form"):
        parse_phone(raw, country)


@pytest.mark.parametrize(
    ("phone", "forms"),
    [
        ("+5215512345678", {"+5215512345678", "+525512345678"}),  # MX: Meta's wa_id keeps the 1
        ("+525512345678", {"+525512345678", "+5215512345678"}),
        ("+5491123456789", {"+5491123456789", "+541123456789"}),  # AR: the 9 of mobiles
        ("+541123456789", {"+541123456789", "+5491123456789"}),
        ("+5511987654321", {"+5511987654321", "+551187654321"}),  # BR: with and without the ninth digit
        ("+551187654321", {"+551187654321", "+5511987654321"}),
        ("+551133334444", {"+551133334444"}),  # a Brazilian landline has no ninth digit
        ("+51987654321", {"+51987654321"}),
        ("+573001234567", {"+573001234567"}),
        ("+34612345678", {"+34612345678"}),
        ("+12025550123", {"+12025550123"}),
    ],
)
def test_the_forms_of_one_mobile_are_matched_together(phone: str, forms: set[str]) -> None:
    assert phone_variants(phone) == forms
    assert all(phone in phone_variants(form) for form in forms)  # symmetric
