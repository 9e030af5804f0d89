"""Generates the quickstart's synthetic task: a `key: value` record, fields in random order,
rewritten as one-line JSON with a fixed key order. SmolLM2-135M-Instruct does this badly out of
the box (extra prose, wrong key order, quoted numbers); a few minutes of LoRA fix it.

usage: python3 scripts/gen_kv2json.py > data/kv2json.jsonl   (deterministic: seed 7)
"""
import json
import random

FIRST = ["Alice", "Bob", "Chen", "Dana", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Victor", "Wen", "Yara"]
LAST = ["Smith", "Okafor", "Tanaka", "Garcia", "Novak", "Haddad", "Larsen", "Moreau", "Rossi", "Kowalski",
        "Silva", "Nguyen", "Schmidt", "Ivanova", "Mensah", "Petrov", "Costa", "Berg", "Ali", "Fischer"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Seoul", "Porto", "Dublin", "Austin",
          "Hanoi", "Zurich", "Accra", "Perth", "Krakow", "Nairobi", "Bogota", "Riga", "Tunis"]
JOBS = ["engineer", "teacher", "nurse", "chef", "pilot", "farmer", "lawyer", "artist", "baker", "plumber"]


def record(rng):
    fields = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(18, 90),
              "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    keys = list(fields)
    rng.shuffle(keys)
    text = "; ".join(f"{k}: {fields[k]}" for k in keys)
    out = json.dumps({k: fields[k] for k in ["name", "age", "city", "job"]})
    return {"instruction": "Rewrite this record as JSON with keys name, age, city, job.", "input": text,
            "output": out}


def main():
    rng = random.Random(7)
    for _ in range(600):
        print(json.dumps(record(rng)))


if __name__ == "__main__":
    main()
