"""Write natural attribute queries ("women's white tops") from a catalog's fixed test split.

Each query names the attributes it asks for, so `hsl eval --queries` can grade every product by
the share of them it matches. Queries come from the attribute combinations that actually occur
among the held-out test products (the same hashed split `hsl train` holds out), most frequent
first: gender + colour + type, then colour + type.

    python data/attribute_queries.py ../shared/data/fashion/products.csv data/queries/fashion_attributes.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

from hsl.dataset import TEST_SALT, in_fraction

GENDER_WORDS = {"Men": "men's", "Women": "women's", "Boys": "boys'", "Girls": "girls'", "Unisex": "unisex"}
TYPE_WORDS = {"Tshirts": "t-shirts", "Tops": "tops", "Flip Flops": "flip flops"}


def phrase(gender: str | None, colour: str, article_type: str) -> str:
    words = [GENDER_WORDS.get(gender, gender.lower())] if gender else []
    words += [colour.lower(), TYPE_WORDS.get(article_type, article_type.lower())]
    return " ".join(words)


def build_queries(rows: list[dict], test_fraction: float, n_full: int, n_short: int) -> list[dict]:
    test = [r for r in rows if in_fraction(r["id"], test_fraction, TEST_SALT)]
    full = Counter((r["gender"], r["baseColour"], r["articleType"]) for r in test)
    short = Counter((r["baseColour"], r["articleType"]) for r in test)
    queries = []
    for (gender, colour, kind), count in full.most_common():
        if len([q for q in queries if "gender" in q["attributes"]]) >= n_full or count < 2:
            break
        queries.append({"query": phrase(gender, colour, kind),
                        "attributes": {"gender": gender, "baseColour": colour, "articleType": kind}})
    for (colour, kind), count in short.most_common():
        if len(queries) >= n_full + n_short or count < 2:
            break
        queries.append({"query": phrase(None, colour, kind), "attributes": {"baseColour": colour, "articleType": kind}})
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--full", type=int, default=80, help="gender + colour + type queries")
    parser.add_argument("--short", type=int, default=40, help="colour + type queries")
    args = parser.parse_args()
    with open(args.manifest, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    queries = build_queries(rows, args.test_fraction, args.full, args.short)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    print(f"{len(queries)} queries -> {args.out}")


if __name__ == "__main__":
    main()
