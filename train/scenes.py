"""The procedural data set the tiny default models learn from: simple scenes of coloured
shapes, their captions, and the ground truth of every scene.

A scene is a background colour and one to three objects (shape, colour, size, position),
optionally moving (video clips). Captions come from the scene by one small grammar:

    a small red circle on a blue background, top left
    two large green stars on a black background
    a yellow triangle on a purple background, in the centre, moving right

The prompt-fidelity checker (`sdlite fidelity`, cli/src/fidelity.rs) parses the same grammar
and recovers the attributes from pixels; the constants below are the contract between the
two, written out once in `grammar()` so the Rust side can check its copy.

Held out from training: every (colour, shape, background) triple whose index falls in
`held_out()`; `held_out_prompts()` draws the evaluation prompts from those triples only.

Rendering is vectorised torch (CPU or GPU): each object is a polygon or disc rasterised at
4x4 supersampling, then box-filtered, so edges are anti-aliased like a photograph of a
flat drawing.
"""

import math
import random

import torch

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle", "star", "cross"]
# Centre of each named position, as fractions of width and height.
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "in the centre": (0.5, 0.5),
}
# Half-extent of an object as a fraction of the image side.
SIZES = {"small": 0.14, "large": 0.22}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# Direction of travel (x, y per clip, fractions of the side; y grows downwards).
MOTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
MOTION_SPAN = 0.4
POSITION_JITTER = 0.04


def grammar():
    """Everything the Rust checker must agree on, as one JSON-able dict."""
    return {
        "colours": COLOURS,
        "shapes": SHAPES,
        "positions": POSITIONS,
        "sizes": SIZES,
        "counts": {str(k): v for k, v in COUNT_WORDS.items()},
        "motions": MOTIONS,
        # The checker matches objects against these very outlines (half-extent 1, y down).
        "outlines": {s: "unit disc" if s == "circle" else unit_polygon(s) for s in SHAPES},
    }


def triple_index(colour, shape, background):
    return (list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)) * len(COLOURS) + list(COLOURS).index(background)


def held_out(colour, shape, background):
    """About one triple in seven never appears in training, by a fixed scramble of its index
    (so every colour, shape and background still appears in training with other partners)."""
    return (triple_index(colour, shape, background) * 37 + 11) % 7 == 0


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def plural(shape):
    return shape + ("es" if shape.endswith("s") else "s")


def caption(scene):
    """The caption of a scene dict (see `sample_scene`)."""
    n, obj = len(scene["objects"]), scene["objects"][0]
    words = [w for w in (obj.get("size_word"), obj["colour"]) if w]
    if n == 1:
        text = f"{article(words[0])} {' '.join(words)} {obj['shape']}"
    else:
        text = f"{COUNT_WORDS[n]} {' '.join(words)} {plural(obj['shape'])}"
    text += f" on {article(scene['background'])} {scene['background']} background"
    if scene.get("position_word"):
        text += f", {scene['position_word']}"
    if scene.get("motion"):
        text += f", moving {scene['motion']}"
    return text


def sample_scene(rng, *, split="train", video=False, triple=None, count=None, with_position=None):
    """A random scene. `split` 'train' draws only triples not held out, 'held_out' only held-out
    ones; `triple`, `count` and `with_position` pin those choices."""
    while triple is None:
        t = (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(COLOURS)))
        if t[0] != t[2] and held_out(*t) == (split == "held_out"):
            triple = t
    colour, shape, background = triple
    if count is None:
        count = 1 if video else rng.choices([1, 2, 3], weights=[6, 2, 1])[0]
    scene = {"background": background, "objects": []}
    if video:
        scene["motion"] = rng.choice(list(MOTIONS))
    if count == 1:
        size_word = rng.choice([None, "small", "large"])
        size = SIZES[size_word or rng.choice(list(SIZES))]
        if video:
            # A moving object's path is centred on its axis of travel and stays in the frame;
            # clips name the motion, not a position.
            dx, dy = MOTIONS[scene["motion"]]
            along, across = 0.5 + rng.uniform(-0.05, 0.05), rng.uniform(0.3, 0.7)
            cx, cy = (along, across) if dx else (across, along)
        else:
            if with_position is None:
                with_position = rng.random() < 0.7
            if with_position:
                scene["position_word"] = rng.choice(list(POSITIONS))
                cx, cy = POSITIONS[scene["position_word"]]
                cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
                cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            else:
                cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)
        scene["objects"].append(dict(shape=shape, colour=colour, size_word=size_word, size=size, x=cx, y=cy))
    else:
        # Several objects: small, in distinct cells of a 3x3 grid, so they never touch.
        size_word = rng.choice([None, "small"])
        cells = rng.sample(range(9), count)
        for c in cells:
            cx = (c % 3 + 0.5) / 3 + rng.uniform(-0.03, 0.03)
            cy = (c // 3 + 0.5) / 3 + rng.uniform(-0.03, 0.03)
            scene["objects"].append(dict(shape=shape, colour=colour, size_word=size_word, size=0.11, x=cx, y=cy))
    scene["caption"] = caption(scene)
    return scene


def unit_polygon(shape):
    """Vertices (x, y), y down, of a shape of half-extent 1 centred on the origin."""
    if shape == "square":
        s = 0.85
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(0.0, -1.0), (0.97, 0.75), (-0.97, 0.75)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.4
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.1))
        return pts
    if shape == "cross":
        w = 0.33
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    raise ValueError(shape)


def coverage(shape, cx, cy, r, size, ss=4):
    """Anti-aliased coverage in [0, 1] of a (size x size) image by N objects of one shape:
    cx, cy, r are (N,) tensors on the device to render on; returns (N, size, size)."""
    n = size * ss
    t = (torch.arange(n, device=cx.device, dtype=torch.float32) + 0.5) / n
    u = (t[None, None, :] - cx[:, None, None]) / r[:, None, None]
    v = (t[None, :, None] - cy[:, None, None]) / r[:, None, None]
    if shape == "circle":
        inside = (u * u + v * v) <= 1.0
    else:
        # Even-odd crossing test against every edge (works for the concave star and cross).
        poly = unit_polygon(shape)
        inside = torch.zeros(u.shape[0], n, n, dtype=torch.bool, device=cx.device)
        for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
            if y0 == y1:
                continue
            crosses = ((v >= min(y0, y1)) & (v < max(y0, y1))) & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0))
            inside ^= crosses
    return torch.nn.functional.avg_pool2d(inside.float()[:, None], ss)[:, 0]


def render_batch(scenes, size=64, frames=1, device="cpu"):
    """Scenes as float RGB in [0, 1]: (N, 3, size, size), or (N, frames, 3, size, size).
    Objects of one shape render together, so a batch costs a few dozen kernel launches."""
    n = len(scenes)
    palette = torch.tensor(list(COLOURS.values()), device=device, dtype=torch.float32) / 255
    names = list(COLOURS)
    bg = palette[torch.tensor([names.index(s["background"]) for s in scenes], device=device)]
    out = bg[:, None, :, None, None].expand(n, frames, 3, size, size).clone()
    phases = [(f / (frames - 1) - 0.5) if frames > 1 else 0.0 for f in range(frames)]
    # Objects never overlap, so painting them in any order gives the same picture; one
    # object slot at a time, so no scene appears twice in one indexed write.
    slots = max(len(s["objects"]) for s in scenes)
    for slot, shape in [(k, sh) for k in range(slots) for sh in SHAPES]:
        rows = [(i, s["objects"][slot], MOTIONS.get(s.get("motion"), (0.0, 0.0))) for i, s in enumerate(scenes) if len(s["objects"]) > slot and s["objects"][slot]["shape"] == shape]
        if not rows:
            continue
        idx = torch.tensor([i for i, _, _ in rows], device=device)
        colour = palette[torch.tensor([names.index(o["colour"]) for _, o, _ in rows], device=device)]
        r = torch.tensor([o["size"] for _, o, _ in rows], device=device)
        for f, phase in enumerate(phases):
            cx = torch.tensor([o["x"] + m[0] * MOTION_SPAN * phase for _, o, m in rows], device=device)
            cy = torch.tensor([o["y"] + m[1] * MOTION_SPAN * phase for _, o, m in rows], device=device)
            a = coverage(shape, cx, cy, r, size)[:, None]
            img = out[idx, f]
            out[idx, f] = img * (1 - a) + colour[:, :, None, None] * a
    return out[:, 0] if frames == 1 else out


def held_out_prompts(n=120, seed=2026, video=False):
    """The fixed evaluation set: held-out triples only. Pictures: every one with a named
    position (single objects) or a count (two or three). Clips: one object and its motion."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        count = 1 if video or i % 6 else rng.choice([2, 3])
        scene = sample_scene(rng, split="held_out", video=video, count=count, with_position=True)
        prompts.append(scene["caption"])
    return prompts


def captions_corpus(n, seed):
    """Captions of random training scenes (image and video), to fit the tokenizer on."""
    rng = random.Random(seed)
    return [sample_scene(rng, video=rng.random() < 0.5)["caption"] for _ in range(n)]


def write_files(repo):
    """The files other parts of the repo read: the grammar (for the Rust checker), the
    held-out prompt sets, and ground-truth renders the checker's tests must read back."""
    import json
    import os

    from PIL import Image

    with open(os.path.join(repo, "train", "grammar.json"), "w") as f:
        json.dump(grammar(), f, indent=1)
        f.write("\n")
    for name, video in [("held-out-sd.txt", False), ("held-out-wan.txt", True)]:
        with open(os.path.join(repo, "train", name), "w") as f:
            f.write("\n".join(held_out_prompts(video=video)) + "\n")
    out = os.path.join(repo, "tests", "data", "scenes")
    os.makedirs(out, exist_ok=True)
    rng = random.Random(404)
    truth = []
    pictures = [sample_scene(rng, split=rng.choice(["train", "held_out"])) for _ in range(60)]
    clips = [sample_scene(rng, video=True) for _ in range(12)]
    for i, (scene, frames) in enumerate([(s, 1) for s in pictures] + [(s, 17) for s in clips]):
        img = render_batch([scene], 64, frames=frames)[0]
        if frames > 1:
            img = torch.cat(list(img), dim=2)  # frames side by side
        name = f"scene-{i:03d}.png"
        Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(os.path.join(out, name))
        truth.append({"file": name, "frames": frames, "caption": scene["caption"]})
    with open(os.path.join(out, "scenes.json"), "w") as f:
        json.dump(truth, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    import os

    write_files(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
