"""What the training scripts share: seeds, the scene data set on the device, the learning-rate
schedule, the weight average, the time budget and the loss log."""

import math
import random
import time

import torch
import torch.nn.functional as F

import scenes

SEED = 20261123
SIZE = 64


def render_dataset(n, seed, device, frames=1, chunk=2048):
    """Captions and uint8 renders of n training scenes on `device`: pictures (n, 3, SIZE, SIZE),
    or clips of moving objects (n, frames, 3, SIZE, SIZE) when frames > 1."""
    rng = random.Random(seed)
    caps, pics = [], []
    for start in range(0, n, chunk):
        batch = [scenes.sample_scene(rng, video=frames > 1) for _ in range(min(chunk, n - start))]
        caps += [s["caption"] for s in batch]
        pics.append((scenes.render_batch(batch, SIZE, frames=frames, device=device) * 255).round().to(torch.uint8))
    return caps, torch.cat(pics)


def to_unit(pics):
    return pics.float() / 127.5 - 1


def cosine_lr(step, steps, warmup, peak):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


class Ema:
    """Exponential moving average of a module's parameters."""

    def __init__(self, module, decay):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    def update(self, module):
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()], 1 - self.decay)

    def copy_to(self, module):
        with torch.no_grad():
            for s, p in zip(self.shadow, module.parameters()):
                p.copy_(s)


class Budget:
    """Caps a training loop's seconds: timed over steps 20..70 (start-up costs excluded), it
    shortens the run to the steps that fit, never lengthens it; the learning-rate schedule
    then runs to that length."""

    def __init__(self, seconds):
        self.seconds, self.started, self.mark = seconds, time.time(), None

    def steps(self, step, steps):
        if not self.seconds or step not in (20, 70):
            return steps
        if step == 20:
            self.mark = time.time()
            return steps
        now = time.time()
        fit = 70 + int((self.seconds - (now - self.started)) / ((now - self.mark) / 50))
        if fit < steps:
            print(f"{steps} steps would outrun {self.seconds} s: training {fit}", flush=True)
        return min(steps, fit)


def outline_l1(recon, target):
    """L1 distance between the differences of neighbouring pixels, down and across, of two
    batches of pictures or clips: how far a reconstruction's outlines are from the target's.
    A plain pixel loss lets a decoder round a star's points or a cross's arms for little cost."""

    def steps(x):
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    return sum(F.l1_loss(r, t) for r, t in zip(steps(recon), steps(target)))


def decoder_parameters(vae):
    """Freezes an autoencoder's encoder side (encoder and quant_conv) and returns the parameters
    left to train: tuning the decoder alone keeps the latent space a trained denoiser draws in."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    return [p for p in vae.parameters() if p.requires_grad]


def log_loss(history, step, loss, started, **extra):
    """Records a step's loss, and any further named figures, with the seconds so far."""
    history.append({"step": step, "loss": loss, **extra, "seconds": round(time.time() - started, 1)})
    figures = "".join(f" {name} {value:.4f}" for name, value in extra.items())
    print(f"step {step:6d} loss {loss:.5f}{figures} {time.time() - started:7.1f}s", flush=True)


def update(opt, loss, params, averages=()):
    """One optimiser step on `loss` (gradients clipped to norm 1), then each (Ema, module)
    weight average."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    for ema, module in averages:
        ema.update(module)


def save_components(root, components):
    """Each (folder name, model) of a pipeline saved in float16 under `root`."""
    import os

    for name, model in components:
        model.to(torch.float16).save_pretrained(os.path.join(root, name), safe_serialization=True)
