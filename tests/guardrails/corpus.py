"""Labelled sentences made here, from a seed: valid values of every kind, near-misses, ordinary prompts.

Valid values are built by the rules their validators check (Luhn, mod-97, SSN
ranges, libphonenumber's example numbers per region, provider token shapes
with random bodies), then put into varied sentences. Near-misses are the
look-alikes the issue names. Used by the detector spec and by the bench.
"""

from __future__ import annotations

import random
import string

import phonenumbers
from schwifty import IBAN
from stdnum import luhn

SENTENCES = [
    "Please use {v} for this.", "My {n} is {v}, thanks.", "{v}", "can you check {v} quickly?",
    "Here it is: {v}. Let me know.", "The {n} on file ({v}) looks wrong.", "I typed {v} in the form but it failed",
    "Update the record with {n} {v} and notify me.", "— {v} —", "Saved {n}:{v} in the notes",
]
PROMPTS = [
    "Summarise this article about the 2024 elections in three bullet points.",
    "Write a haiku about autumn leaves and rain.", "What is the capital of Australia?",
    "Refactor this function to use a list comprehension: for i in range(10): out.append(i * 2)",
    "Explain the difference between TCP and UDP.", "Give me a recipe for pancakes for 4 people.",
    "How many minutes are in 3.5 hours?", "Translate 'good morning' into Japanese.",
    "What happened in 1969 on July 20?", "Compare Python 3.11 and 3.12 performance.",
    "Our meeting is on 2024-03-14 at 10:30 in room 204.", "The invoice total is $1,234.56 for order 88213.",
    "Set the timeout to 30000 ms and retries to 5.", "Version 2.4.1 fixed the bug in release 2.4.0.",
    "What is 15% of 2,480?", "My flight number is LH 441 departing at 09:45.",
]


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                 ("6011", 16), ("65", 16), ("3530", 16), ("4", 13)])
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    num = body + luhn.calc_check_digit(body)
    if length == 16 and rng.random() < 0.6:
        sep = rng.choice([" ", "-"])
        num = sep.join(num[i:i + 4] for i in range(0, 16, 4))
    return num


def _iban(rng: random.Random) -> str:
    country = rng.choice(["DE", "GB", "FR", "ES", "IT", "NL", "BE", "CH", "AT", "PL", "SE", "IE"])
    iban = IBAN.random(country_code=country, random=rng)
    return iban.formatted if rng.random() < 0.5 else str(iban)


def _ssn(rng: random.Random) -> str:
    while True:
        area = rng.randint(1, 899)
        if area != 666:
            break
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def _phone(rng: random.Random) -> str:
    region = rng.choice(["US", "GB", "DE", "FR", "IN", "CA", "AU"])
    num = phonenumbers.example_number_for_type(region, rng.choice(
        [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]))
    fmt = rng.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164]
                     + ([phonenumbers.PhoneNumberFormat.NATIONAL] if region == "US" else []))
    return phonenumbers.format_number(num, fmt)


def _email(rng: random.Random) -> str:
    user = rng.choice(["jane.doe", "j.smith", "alex_99", "m.mueller+news", "ops-team", "k.tanaka"])
    return f"{user}@{rng.choice(['example.com', 'corp.io', 'mail.co.uk', 'uni-bonn.de', 'acme.org'])}"


def _rand(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _credential(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return "AKIA" + _rand(rng, 16, string.ascii_uppercase + string.digits)
    if kind == 1:
        return "ghp_" + _rand(rng, 36)
    if kind == 2:
        return "sk-proj-" + _rand(rng, 48, string.ascii_letters + string.digits + "_-")
    if kind == 3:
        return "sk-ant-api03-" + _rand(rng, 93, string.ascii_letters + string.digits + "_-") + "AA"
    if kind == 4:
        return "xoxb-" + _rand(rng, 12, string.digits) + "-" + _rand(rng, 13, string.digits) + "-" + _rand(rng, 24)
    if kind == 5:
        return "AIza" + _rand(rng, 35, string.ascii_letters + string.digits + "_-")
    return "password = " + _rand(rng, 6) + rng.choice("!#%&*") + _rand(rng, 6)


def _private_key(rng: random.Random) -> str:
    kind = rng.choice(["RSA ", "EC ", "", "OPENSSH "])
    lines = "\n".join(_rand(rng, 64, string.ascii_letters + string.digits + "+/") for _ in range(rng.randint(2, 6)))
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{lines}\n-----END {kind}PRIVATE KEY-----"


MAKERS = {"card": (_card, "card number"), "iban": (_iban, "IBAN"), "national_id": (_ssn, "SSN"),
          "phone": (_phone, "phone"), "email": (_email, "email"), "credential": (_credential, "key"),
          "private_key": (_private_key, "key")}


def _near_miss(rng: random.Random) -> str:
    k = rng.randrange(9)
    if k == 0:  # a card-shaped number failing Luhn
        c = _card(rng).replace(" ", "").replace("-", "")
        return c[:-1] + str((int(c[-1]) + rng.randint(1, 9)) % 10)
    if k == 1:  # an IBAN with a wrong check digit
        i = str(IBAN.random(country_code="DE", random=rng))
        return i[:2] + f"{(int(i[2:4]) + rng.randint(1, 50)) % 97 + 2:02d}" + i[4:]
    if k == 2:
        return f"978-{rng.randint(0, 9)}-{rng.randint(100, 999)}-{rng.randint(10000, 99999)}-{rng.randint(0, 9)}"
    if k == 3:
        return "-".join(_rand(rng, n, "0123456789abcdef") for n in (8, 4, 4, 4, 12))
    if k == 4:
        return _rand(rng, 40, "0123456789abcdef")
    if k == 5:
        return f"v{rng.randint(1, 20)}.{rng.randint(0, 30)}.{rng.randint(0, 200)}"
    if k == 6:
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if k == 7:
        return rng.choice(["sk-...", "YOUR_KEY_HERE", "sk-xxxxxxxxxxxxxxxx", "<your-api-key>", "${OPENAI_API_KEY}",
                           "AKIAIOSFODNN7EXAMPLE", "ghp_XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"])
    return f"ORD-{rng.randint(10**9, 10**10)}"


def positives(kind: str, n: int, seed: int = 7) -> list[str]:
    rng = random.Random(f"{kind}-{seed}")
    make, noun = MAKERS[kind]
    return [rng.choice(SENTENCES).format(n=noun, v=make(rng)) for _ in range(n)]


def near_misses(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(f"near-{seed}")
    return [rng.choice(SENTENCES).format(n=rng.choice(["id", "number", "reference", "token"]), v=_near_miss(rng))
            for _ in range(n)]
