"""`webhook` (the status-webhook receiver), `optout add|remove|list` and `suppressed list|clear`."""

from __future__ import annotations

import argparse
import sys

from worker.cli.common import number_id, open_checked_store, parse_phone_or_none
from worker.cli.output import SafeCSV, printable
from worker.config import ConfigError, Settings
from worker.exits import EX_OK
from worker.log import get_logger
from worker.models import SOURCE_OPERATOR
from worker.webhook.serve import run_receiver

OPTOUT_PAGE = 1000
OPTOUT_COLUMNS = ("telefono", "source", "detail", "created_at")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    webhook = commands.add_parser(
        "webhook", help="receive Meta's status webhooks and inbound replies (settles unknown outcomes)"
    )
    webhook.set_defaults(handler=cmd_webhook)

    optout = commands.add_parser("optout", help="phones that must never be messaged")
    actions = optout.add_subparsers(dest="optout_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="opt a phone out (its waiting rows end in error, unsent)")
    add.add_argument("phone", help="E.164 phone, e.g. +51987654321 (the + may be left out)")
    add.add_argument("--reason", help="a note kept with the opt-out")
    add.set_defaults(handler=cmd_optout_add)
    remove = actions.add_parser("remove", help="let a phone be messaged again")
    remove.add_argument("phone")
    remove.set_defaults(handler=cmd_optout_remove)
    listing = actions.add_parser("list", help="every opted-out phone, oldest first")
    listing.add_argument("--csv", action="store_true", help="CSV with a header, for a spreadsheet")
    listing.set_defaults(handler=cmd_optout_list)

    held = commands.add_parser("suppressed", help="phones a sending number could not deliver to (131026)")
    held_actions = held.add_subparsers(dest="suppressed_command", required=True, metavar="ACTION")
    held_list = held_actions.add_parser("list", help="every phone held now, with its number and until when")
    held_list.add_argument("--csv", action="store_true", help="CSV with a header, for a spreadsheet")
    held_list.set_defaults(handler=cmd_suppressed_list)
    clear = held_actions.add_parser("clear", help="let a held phone be sent to again")
    clear.add_argument("phone")
    clear.add_argument("--number", type=number_id, help="only on this sending number (default: every number)")
    clear.set_defaults(handler=cmd_suppressed_clear)


async def cmd_webhook(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.app_secret:
        raise ConfigError(
            "WHATSAPP_APP_SECRET or WHATSAPP_APP_SECRET_FILE must be set: it signs Meta's webhooks"
        )
    if not settings.verify_token:
        raise ConfigError("WHATSAPP_VERIFY_TOKEN must be set: Meta's subscription handshake sends it")
    store = await open_checked_store(settings, size=4)
    try:
        return await run_receiver(settings, store, log=get_logger(worker_id=settings.worker_id))
    finally:
        await store.close()


async def cmd_optout_add(settings: Settings, args: argparse.Namespace) -> int:
    phone = parse_phone_or_none(args.phone, settings)
    if phone is None:
        return 2
    store = await open_checked_store(settings)
    try:
        added = await store.optouts.add(phone, SOURCE_OPERATOR, args.reason)
    finally:
        await store.close()
    print(f"{phone} opted out" if added else f"{phone} had already opted out: nothing changed")
    return EX_OK


async def cmd_optout_remove(settings: Settings, args: argparse.Namespace) -> int:
    phone = parse_phone_or_none(args.phone, settings)
    if phone is None:
        return 2
    store = await open_checked_store(settings)
    try:
        removed = await store.optouts.remove(phone)
    finally:
        await store.close()
    if not removed:
        print(f"whatsapp-worker: {phone} is not opted out: nothing changed", file=sys.stderr)
        return 1
    print(f"{phone} may be messaged again (rows already closed as opted out stay closed)")
    return EX_OK


async def cmd_optout_list(settings: Settings, args: argparse.Namespace) -> int:
    writer = SafeCSV(OPTOUT_COLUMNS) if args.csv else None
    store = await open_checked_store(settings)
    shown, after = 0, 0
    try:
        while page := await store.optouts.page(after_id=after, limit=OPTOUT_PAGE):
            for row in page:
                created = row.created_at.isoformat(sep=" ", timespec="seconds")
                if writer:
                    writer.row([row.telefono, row.source, row.detail, created])
                else:
                    print(f"{row.telefono}  {row.source}  {created} UTC  {printable(row.detail)}".rstrip())
            after, shown = page[-1].id, shown + len(page)
    finally:
        await store.close()
    if not writer:
        print(f"{shown} opted-out phone(s)", file=sys.stderr)
    return EX_OK


SUPPRESSED_COLUMNS = ("phone", "phone_number_id", "code", "until_utc", "reason")


async def cmd_suppressed_list(settings: Settings, args: argparse.Namespace) -> int:
    writer = SafeCSV(SUPPRESSED_COLUMNS) if args.csv else None
    store = await open_checked_store(settings)
    shown, after = 0, 0
    try:
        while page := await store.suppressions.page(after_id=after, limit=OPTOUT_PAGE):
            for row in page:
                until = row.expires_at.isoformat(sep=" ", timespec="seconds")
                values = [row.telefono, row.phone_number_id, row.code, until, row.reason]
                if writer:
                    writer.row(values)
                else:
                    print(f"{row.telefono}  number {row.phone_number_id}  until {until} UTC  code {row.code}")
            after, shown = page[-1].id, shown + len(page)
    finally:
        await store.close()
    if not writer:
        print(f"{shown} phone(s) held as undeliverable", file=sys.stderr)
    return EX_OK


async def cmd_suppressed_clear(settings: Settings, args: argparse.Namespace) -> int:
    phone = parse_phone_or_none(args.phone, settings)
    if phone is None:
        return 2
    store = await open_checked_store(settings)
    try:
        lifted = await store.suppressions.clear(phone, args.number)
    finally:
        await store.close()
    if not lifted:
        print(f"whatsapp-worker: {phone} is not held as undeliverable", file=sys.stderr)
        return 1
    print(f"{phone} may be sent to again ({lifted} number(s))")
    return EX_OK
