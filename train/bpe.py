"""A CLIP-format byte-level BPE vocabulary fitted to the caption grammar.

The base alphabet is CLIP's: the 256 byte characters, each also with the `</w>` word end,
so any text still tokenizes. Merges are learnt on the words of a caption corpus (pairs by
frequency, ties broken by the pair's text) until no pair occurs twice, which turns every
grammar word into one token. The result is a `vocab.json` / `merges.txt` the reference
`CLIPTokenizer` and our `ClipTokenizer` read.
"""

import collections
import re

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def byte_chars():
    """GPT-2's reversible byte-to-printable-character map, in byte order."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def fit(corpus, max_merges=1000):
    """(vocab, merges) fitted to the words of `corpus` (a list of captions)."""
    words = collections.Counter(w for line in corpus for w in WORD.findall(line.lower()))
    chars = byte_chars()
    # Word symbols: byte characters with the word end glued to the last one, as CLIP does.
    pieces = {}
    for w in words:
        syms = [chars[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        pieces[w] = syms
    merges = []
    while len(merges) < max_merges:
        pairs = collections.Counter()
        for w, n in words.items():
            syms = pieces[w]
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best, n = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if n < 2:
            break
        merges.append(best)
        for w, syms in pieces.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            pieces[w] = out
    # Two merges can spell the same token ("ab"+"c", "a"+"bc"): it keeps its first id.
    vocab = {}
    for t in chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]:
        vocab.setdefault(t, len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]
