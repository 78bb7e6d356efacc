#!/usr/bin/env python3
"""Writes the training benchmarks' data into DIR: random-pixel PNGs with 24-28-word
captions (each word a single WordPiece token), `tiny.json` (256 images of 64 px) and
`base.json` (16 of 224 px) in BLIP's annotation format, and `vocab.txt`, a 262-word
vocabulary (264 with [DEC] and [ENC]) for the small-vocabulary rows.

    python3 scripts/bench_data.py DIR
"""
import json, random, sys, zlib, struct
root = sys.argv[1]
random.seed(0)
words = ("a the red blue green dog cat car tree house man woman sits on near with under "
         "over big small old new bright dark sky road water field table chair").split()

def png(path, size):
    # An RGB PNG of random pixels, written without PIL.
    raw = b"".join(b"\0" + bytes(random.getrandbits(8) for _ in range(3 * size))
                   for _ in range(size))
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

for name, size, count in [("tiny", 64, 256), ("base", 224, 16)]:
    ann = []
    for i in range(count):
        png(f"{root}/{name}-{i:04}.png", size)
        caption = " ".join(random.choice(words) for _ in range(random.randint(24, 28)))
        ann.append({"image": f"{name}-{i:04}.png", "caption": caption, "image_id": str(i)})
    json.dump(ann, open(f"{root}/{name}.json", "w"))
specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
filler = [f"w{i}" for i in range(262 - len(specials) - len(words))]
open(f"{root}/vocab.txt", "w").write("\n".join(specials + words + filler) + "\n")
