//! Prompt fidelity of the built-in models, by plain image analysis (no learned model):
//! recovers the background colour and every object's colour, shape and position from a
//! picture, and the direction of travel from a clip, then scores them against what the
//! prompt asks for.
//!
//! The prompts follow the caption grammar of the training scenes (`train/scenes.py`);
//! `train/grammar.json`, written by that script, gives the palette, the shapes' outlines,
//! named positions and motions, so the two sides cannot drift apart.
//!
//! Analysis: the background is the palette colour most of the border votes for; pixels far
//! from the measured background colour are foreground; 4-connected foreground components
//! are objects (specks under a quarter of the largest are ignored). An object's colour is
//! the nearest palette colour to its median pixel; its position the named position nearest
//! its centroid. Its shape is the outline that best overlaps it: each of the generator's
//! outlines is drawn at the object's centroid, scaled to the object's area, and the one
//! with the highest intersection over union with the object wins. Whole-outline overlap
//! forgives what pixels and soft edges do to corners and points, which ratios such as
//! extent or solidity read as a different shape. In a clip the largest object's centroid,
//! first frame to last, gives the motion.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

static GRAMMAR: &str = include_str!("../../train/grammar.json");

/// Each side of a pixel is sampled this many times when an outline is drawn (as the
/// generator does), and a pixel at least half covered belongs to the outline.
const OUTLINE_SAMPLES: usize = 4;
/// A pixel this far (RGB, 0..255) from the background colour is foreground.
const FOREGROUND_DISTANCE: f32 = 80.0;
/// A clip's object must travel this fraction of the frame to count as moving.
const MIN_TRAVEL: f32 = 0.08;

pub struct Grammar {
    colours: Vec<(String, [f32; 3])>,
    shapes: Vec<(String, Outline)>,
    positions: Vec<(String, [f32; 2])>,
    counts: Vec<(usize, String)>,
    motions: Vec<(String, [f32; 2])>,
}

impl Grammar {
    pub fn load() -> Self {
        let v: Value = serde_json::from_str(GRAMMAR).expect("train/grammar.json is JSON");
        let pairs = |key: &str| -> Vec<(String, Vec<f32>)> {
            v[key]
                .as_object()
                .expect("grammar maps")
                .iter()
                .map(|(k, x)| {
                    (
                        k.clone(),
                        x.as_array()
                            .expect("numbers")
                            .iter()
                            .map(|n| n.as_f64().expect("number") as f32)
                            .collect(),
                    )
                })
                .collect()
        };
        Grammar {
            colours: pairs("colours").into_iter().map(|(k, c)| (k, [c[0], c[1], c[2]])).collect(),
            shapes: v["shapes"]
                .as_array()
                .expect("shapes")
                .iter()
                .map(|s| {
                    let name = s.as_str().expect("shape");
                    (name.to_string(), Outline::from_grammar(&v["outlines"][name]))
                })
                .collect(),
            positions: pairs("positions").into_iter().map(|(k, p)| (k, [p[0], p[1]])).collect(),
            counts: v["counts"]
                .as_object()
                .expect("counts")
                .iter()
                .map(|(n, w)| (n.parse().expect("count"), w.as_str().expect("word").to_string()))
                .collect(),
            motions: pairs("motions").into_iter().map(|(k, m)| (k, [m[0], m[1]])).collect(),
        }
    }

    fn nearest_colour(&self, rgb: [f32; 3]) -> &str {
        let d = |c: &[f32; 3]| (0..3).map(|i| (c[i] - rgb[i]).powi(2)).sum::<f32>();
        &self.colours.iter().min_by(|a, b| d(&a.1).total_cmp(&d(&b.1))).expect("palette").0
    }
}

/// What a prompt asks for.
#[derive(Debug, PartialEq)]
pub struct Expected {
    pub count: usize,
    pub colour: String,
    pub shape: String,
    pub background: String,
    pub position: Option<String>,
    pub motion: Option<String>,
}

/// Reads a prompt of the caption grammar: `a small red circle on a blue background, top
/// left`, `two green stars on a black background`, `... , moving right`.
pub fn parse(g: &Grammar, prompt: &str) -> Result<Expected> {
    let text = prompt.to_lowercase();
    let words: Vec<&str> = text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let bad = |what: &str| anyhow::anyhow!("prompt `{prompt}` is not in the scene grammar (train/scenes.py): {what}");
    let count = match words.first() {
        Some(&("a" | "an" | "one")) => 1,
        Some(w) => g
            .counts
            .iter()
            .find(|(_, word)| word == w)
            .map(|(n, _)| *n)
            .ok_or_else(|| bad("no count word first"))?,
        None => return Err(bad("empty")),
    };
    let bg_at = words.iter().position(|w| *w == "background").ok_or_else(|| bad("no background"))?;
    // Before "background": the object's colour first, the background's last.
    let colours: Vec<&&str> = words[..bg_at].iter().filter(|w| g.colours.iter().any(|(c, _)| c == **w)).collect();
    let (colour, background) = match colours.as_slice() {
        [first, .., last] => (first, last),
        _ => return Err(bad("an object colour and a background colour")),
    };
    let shape = words[..bg_at]
        .iter()
        .find_map(|w| {
            g.shapes
                .iter()
                .map(|(s, _)| s)
                .find(|s| *w == s.as_str() || w.strip_suffix('s').is_some_and(|x| x == *s || x.strip_suffix('e') == Some(s)))
        })
        .ok_or_else(|| bad("no shape"))?;
    let tail = words[bg_at + 1..].join(" ");
    let position = g.positions.iter().find(|(p, _)| tail.contains(p.as_str())).map(|(p, _)| p.clone());
    let motion = words[bg_at + 1..]
        .windows(2)
        .find(|w| w[0] == "moving")
        .map(|w| w[1].to_string())
        .filter(|m| g.motions.iter().any(|(k, _)| k == m));
    Ok(Expected {
        count,
        colour: colour.to_string(),
        shape: shape.clone(),
        background: background.to_string(),
        position,
        motion,
    })
}

/// One object found in a picture; coordinates are fractions of width and height.
#[derive(Debug)]
pub struct Blob {
    pub colour: String,
    pub shape: String,
    pub position: String,
    pub x: f32,
    pub y: f32,
}

#[derive(Debug)]
pub struct Observed {
    pub background: String,
    /// Largest first.
    pub objects: Vec<Blob>,
    pub motion: Option<String>,
}

/// Analyses an RGB picture (interleaved, 8-bit, `w` x `h`).
fn observe_picture(g: &Grammar, rgb: &[u8], w: usize, h: usize) -> Observed {
    let px = |i: usize| [rgb[3 * i] as f32, rgb[3 * i + 1] as f32, rgb[3 * i + 2] as f32];
    let border: Vec<usize> = (0..w * h)
        .filter(|&i| i % w == 0 || i % w == w - 1 || i / w == 0 || i / w == h - 1)
        .collect();
    let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &border {
        *votes.entry(g.nearest_colour(px(i))).or_default() += 1;
    }
    let background = votes.iter().max_by_key(|(_, n)| **n).map(|(c, _)| c.to_string()).expect("pixels");
    let bg = median(border.iter().map(|&i| px(i)).filter(|p| g.nearest_colour(*p) == background));
    let dist = |p: [f32; 3]| (0..3).map(|k| (p[k] - bg[k]).powi(2)).sum::<f32>().sqrt();
    let fg: Vec<bool> = (0..w * h).map(|i| dist(px(i)) > FOREGROUND_DISTANCE).collect();

    let mut label = vec![usize::MAX; w * h];
    let mut components: Vec<Vec<usize>> = Vec::new();
    for start in 0..w * h {
        if !fg[start] || label[start] != usize::MAX {
            continue;
        }
        let id = components.len();
        let (mut stack, mut members) = (vec![start], Vec::new());
        label[start] = id;
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = (i % w, i / w);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            for j in neighbours.into_iter().flatten() {
                if fg[j] && label[j] == usize::MAX {
                    label[j] = id;
                    stack.push(j);
                }
            }
        }
        components.push(members);
    }
    components.sort_by_key(|c| std::cmp::Reverse(c.len()));
    let largest = components.first().map_or(0, |c| c.len());
    let objects = components
        .iter()
        .take_while(|c| c.len() * 4 >= largest && c.len() >= 4)
        .map(|c| {
            let (x, y) = centroid(c, w);
            let (x, y) = (x / w as f32, y / h as f32);
            let colour = median(c.iter().map(|&i| px(i)));
            // The shape is the half-coverage outline: pixels at least halfway from the
            // background colour to the object's, so soft edges neither fatten nor thin it.
            let span: [f32; 3] = std::array::from_fn(|k| colour[k] - bg[k]);
            let norm = span.iter().map(|v| v * v).sum::<f32>().max(1.0);
            let core: Vec<usize> = c
                .iter()
                .copied()
                .filter(|&i| (0..3).map(|k| (px(i)[k] - bg[k]) * span[k]).sum::<f32>() >= 0.5 * norm)
                .collect();
            Blob {
                colour: g.nearest_colour(colour).to_string(),
                shape: classify_shape(g, if core.is_empty() { c } else { &core }, w, h).to_string(),
                position: nearest(&g.positions, [x, y]).to_string(),
                x,
                y,
            }
        })
        .collect();
    Observed {
        background,
        objects,
        motion: None,
    }
}

/// Analyses a picture or a clip (`frames` RGB pictures of `w` x `h`, at least one): the
/// first frame's objects and background and, for a clip, the largest object's direction
/// of travel over it.
pub fn observe(g: &Grammar, frames: &[Vec<u8>], w: usize, h: usize) -> Observed {
    let first = observe_picture(g, &frames[0], w, h);
    if frames.len() == 1 {
        return first;
    }
    let last = observe_picture(g, &frames[frames.len() - 1], w, h);
    let motion = match (first.objects.first(), last.objects.first()) {
        (Some(a), Some(b)) => {
            let d = [b.x - a.x, b.y - a.y];
            (d[0].hypot(d[1]) >= MIN_TRAVEL).then(|| {
                let dot = |m: &[f32; 2]| m[0] * d[0] + m[1] * d[1];
                g.motions
                    .iter()
                    .max_by(|a, b| dot(&a.1).total_cmp(&dot(&b.1)))
                    .expect("motions")
                    .0
                    .clone()
            })
        }
        _ => None,
    };
    Observed { motion, ..first }
}

fn median(pixels: impl Iterator<Item = [f32; 3]>) -> [f32; 3] {
    let all: Vec<[f32; 3]> = pixels.collect();
    if all.is_empty() {
        return [0.0; 3];
    }
    std::array::from_fn(|k| {
        let mut c: Vec<f32> = all.iter().map(|p| p[k]).collect();
        c.sort_by(f32::total_cmp);
        c[c.len() / 2]
    })
}

fn centroid(pixels: &[usize], w: usize) -> (f32, f32) {
    let n = pixels.len() as f32;
    let sx: f32 = pixels.iter().map(|&i| (i % w) as f32 + 0.5).sum();
    let sy: f32 = pixels.iter().map(|&i| (i / w) as f32 + 0.5).sum();
    (sx / n, sy / n)
}

fn nearest(named: &[(String, [f32; 2])], p: [f32; 2]) -> &str {
    let d = |q: &[f32; 2]| (q[0] - p[0]).powi(2) + (q[1] - p[1]).powi(2);
    &named.iter().min_by(|a, b| d(&a.1).total_cmp(&d(&b.1))).expect("positions").0
}

/// A shape as the scene generator draws it: half-extent 1, centred on the origin, y down.
enum Outline {
    Disc,
    Polygon(Vec<[f32; 2]>),
}

impl Outline {
    fn from_grammar(v: &Value) -> Self {
        match v {
            Value::String(s) if s == "unit disc" => Outline::Disc,
            Value::Array(points) => Outline::Polygon(
                points
                    .iter()
                    .map(|p| {
                        let xy = |k: usize| p[k].as_f64().expect("outline vertex") as f32;
                        [xy(0), xy(1)]
                    })
                    .collect(),
            ),
            other => panic!("train/grammar.json: outline {other} is neither \"unit disc\" nor a polygon"),
        }
    }

    /// Even-odd rule with half-open edges, as the generator rasterises (the star and the
    /// cross are concave).
    fn contains(&self, [u, v]: [f32; 2]) -> bool {
        match self {
            Outline::Disc => u * u + v * v <= 1.0,
            Outline::Polygon(p) => {
                let mut inside = false;
                for (a, b) in p.iter().zip(p.iter().cycle().skip(1)) {
                    if a[1] != b[1] && v >= a[1].min(b[1]) && v < a[1].max(b[1]) && u < a[0] + (v - a[1]) * (b[0] - a[0]) / (b[1] - a[1]) {
                        inside = !inside;
                    }
                }
                inside
            }
        }
    }

    /// Area and centroid (shoelace formulas for the polygon).
    fn area_centroid(&self) -> (f32, [f32; 2]) {
        match self {
            Outline::Disc => (std::f32::consts::PI, [0.0, 0.0]),
            Outline::Polygon(p) => {
                let (mut twice, mut cx, mut cy) = (0.0, 0.0, 0.0);
                for (a, b) in p.iter().zip(p.iter().cycle().skip(1)) {
                    let c = a[0] * b[1] - b[0] * a[1];
                    twice += c;
                    cx += (a[0] + b[0]) * c;
                    cy += (a[1] + b[1]) * c;
                }
                ((twice / 2.0).abs(), [cx / (3.0 * twice), cy / (3.0 * twice)])
            }
        }
    }

    /// Distance from the origin to the farthest point of the outline.
    fn reach(&self) -> f32 {
        match self {
            Outline::Disc => 1.0,
            Outline::Polygon(p) => p.iter().map(|q| q[0].hypot(q[1])).fold(0.0, f32::max),
        }
    }
}

/// The grammar's shape whose outline, drawn over the object with the object's centroid and
/// area, has the highest intersection over union with the object's pixels (of a `w` x `h`
/// picture).
fn classify_shape<'g>(g: &'g Grammar, pixels: &[usize], w: usize, h: usize) -> &'g str {
    let mut object = vec![false; w * h];
    for &i in pixels {
        object[i] = true;
    }
    let (cx, cy) = centroid(pixels, w);
    let area = pixels.len() as f32;
    let bounds = |along: &dyn Fn(usize) -> usize| {
        let values = pixels.iter().map(|&i| along(i));
        (values.clone().min().unwrap_or(0), values.max().unwrap_or(0))
    };
    let (x0, x1) = bounds(&|i| i % w);
    let (y0, y1) = bounds(&|i| i / w);
    let iou = |outline: &Outline| -> f32 {
        let (unit_area, unit_centroid) = outline.area_centroid();
        let r = (area / unit_area).sqrt();
        let centre = [cx - unit_centroid[0] * r, cy - unit_centroid[1] * r];
        let reach = outline.reach() * r;
        // Pixels of the picture that the object or the drawn outline may touch.
        let span = |lo: usize, hi: usize, c: f32, n: usize| {
            ((c - reach).floor().max(0.0) as usize).min(lo)..((c + reach).ceil().max(0.0) as usize).max(hi + 1).min(n)
        };
        let (xs, ys) = (span(x0, x1, centre[0], w), span(y0, y1, centre[1], h));
        let (mut both, mut either) = (0usize, 0usize);
        for y in ys {
            for x in xs.clone() {
                let covered = (0..OUTLINE_SAMPLES * OUTLINE_SAMPLES)
                    .filter(|k| {
                        let sub = |j: usize, p: usize, c: f32| (p as f32 + (j as f32 + 0.5) / OUTLINE_SAMPLES as f32 - c) / r;
                        outline.contains([sub(k % OUTLINE_SAMPLES, x, centre[0]), sub(k / OUTLINE_SAMPLES, y, centre[1])])
                    })
                    .count();
                let drawn = 2 * covered >= OUTLINE_SAMPLES * OUTLINE_SAMPLES;
                let seen = object[y * w + x];
                both += (drawn && seen) as usize;
                either += (drawn || seen) as usize;
            }
        }
        both as f32 / either.max(1) as f32
    };
    g.shapes
        .iter()
        .map(|(name, outline)| (name, iou(outline)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("shapes")
        .0
}

/// Per-attribute outcome of one prompt: `None` where the prompt does not ask.
#[derive(Debug, Default, Clone, Copy)]
pub struct Score {
    pub colour: Option<bool>,
    pub shape: Option<bool>,
    pub background: Option<bool>,
    pub count: Option<bool>,
    pub position: Option<bool>,
    pub motion: Option<bool>,
}

pub const ATTRIBUTES: [&str; 6] = ["colour", "shape", "background", "count", "position", "motion"];

impl Score {
    pub fn get(&self, attribute: &str) -> Option<bool> {
        match attribute {
            "colour" => self.colour,
            "shape" => self.shape,
            "background" => self.background,
            "count" => self.count,
            "position" => self.position,
            "motion" => self.motion,
            _ => None,
        }
    }
}

/// Colour and shape must hold for every object found; position is the largest object's.
pub fn score(e: &Expected, o: &Observed) -> Score {
    let any = !o.objects.is_empty();
    Score {
        colour: Some(any && o.objects.iter().all(|b| b.colour == e.colour)),
        shape: Some(any && o.objects.iter().all(|b| b.shape == e.shape)),
        background: Some(o.background == e.background),
        count: Some(o.objects.len() == e.count),
        position: e.position.as_ref().map(|p| o.objects.first().is_some_and(|b| &b.position == p)),
        motion: e.motion.as_ref().map(|m| o.motion.as_ref() == Some(m)),
    }
}

/// Accuracy per attribute over many scores: (correct, asked).
pub fn tally(scores: &[Score]) -> Vec<(&'static str, usize, usize)> {
    ATTRIBUTES
        .iter()
        .map(|a| {
            let asked: Vec<bool> = scores.iter().filter_map(|s| s.get(a)).collect();
            (*a, asked.iter().filter(|x| **x).count(), asked.len())
        })
        .collect()
}

/// Reads a PNG as interleaved 8-bit RGB; an animated PNG's frames side by side count as
/// one picture (`frames` splits them).
pub fn read_rgb(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size().context("PNG too large")?];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("decoding {}", path.display()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => bail!("{}: {other:?} PNG, expected RGB or RGBA", path.display()),
    };
    if info.bit_depth != png::BitDepth::Eight {
        bail!("{}: {:?}-bit PNG, expected 8-bit", path.display(), info.bit_depth);
    }
    let rgb = buf[..w * h * channels].chunks(channels).flat_map(|p| [p[0], p[1], p[2]]).collect();
    Ok((rgb, w, h))
}

/// Splits a strip of `frames` pictures laid side by side into the pictures.
pub fn split_strip(rgb: &[u8], w: usize, h: usize, frames: usize) -> Vec<Vec<u8>> {
    let fw = w / frames;
    (0..frames)
        .map(|f| {
            (0..h)
                .flat_map(|y| rgb[3 * (y * w + f * fw)..3 * (y * w + (f + 1) * fw)].iter().copied())
                .collect()
        })
        .collect()
}

#[derive(clap::Args)]
pub struct FidelityArgs {
    /// The model to evaluate: a built-in name (`tiny-sd`, `tiny-wan`) or a folder.
    #[arg(long, default_value = crate::default_models::DEFAULT)]
    model: String,
    /// One prompt per line; the model's held-out set (train/held-out-*.txt) by default.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Only the first N prompts (after --skip).
    #[arg(long)]
    limit: Option<usize>,
    /// Start at prompt N; a prompt's seed stays its index in the set, so processes that
    /// share one set between them give the same results as one process.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    #[arg(long, value_enum, default_value_t = crate::gen::BackendKind::Cpu)]
    backend: crate::gen::BackendKind,
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Keep every generated picture or clip here, with a report.json.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Score one existing PNG against --prompt instead of generating (`--frames N` for a
    /// strip of N frames side by side).
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value_t = 1)]
    frames: usize,
    /// Score again the pictures an earlier run kept in this folder (its --out-dir) instead
    /// of generating; --out-dir then takes the new report.json.
    #[arg(long, conflicts_with_all = ["image", "prompts", "skip", "limit"])]
    rescore: Option<PathBuf>,
    #[command(flatten)]
    device: crate::DeviceArgs,
}

pub fn run(args: FidelityArgs) -> Result<()> {
    let g = Grammar::load();
    if let Some(path) = &args.image {
        let prompt = args.prompt.as_deref().context("--image needs --prompt")?;
        let expected = parse(&g, prompt)?;
        let (rgb, w, h) = read_rgb(path)?;
        ensure!(
            args.frames >= 1 && w % args.frames == 0,
            "{}: a width of {w} pixels does not split into --frames {} frames",
            path.display(),
            args.frames
        );
        let observed = observe(&g, &split_strip(&rgb, w, h, args.frames), w / args.frames, h);
        println!("expected {expected:?}\nobserved {observed:?}");
        let s = score(&expected, &observed);
        for a in ATTRIBUTES {
            if let Some(ok) = s.get(a) {
                println!("{a}: {}", if ok { "ok" } else { "MISSED" });
            }
        }
        return Ok(());
    }
    if let Some(dir) = &args.rescore {
        return rescore(&g, dir, args.out_dir.as_deref());
    }
    let model = crate::default_models::resolve(&args.model)?;
    let video = std::fs::read_to_string(model.join("model_index.json")).is_ok_and(|t| t.contains("\"Wan"));
    let prompts_path = args.prompts.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("train")
            .join(if video { "held-out-wan.txt" } else { "held-out-sd.txt" })
    });
    let text = std::fs::read_to_string(&prompts_path).with_context(|| format!("reading {}", prompts_path.display()))?;
    let prompts: Vec<(usize, &str)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .skip(args.skip)
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    let expected = prompts.iter().map(|(_, p)| parse(&g, p)).collect::<Result<Vec<_>>>()?;
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let started = Instant::now();
    let mut scores = Vec::new();
    let mut entries = Vec::new();
    let mut render = crate::gen::Renderer::open(args.backend, &args.device, &model, args.steps)?;
    for (done, ((i, prompt), e)) in prompts.iter().zip(&expected).enumerate() {
        let (frames, w, h) = render.run(prompt, *i as u64)?;
        let (s, entry) = judge(&g, e, prompt, *i, &frames, w, h);
        let missed = misses(&s);
        eprintln!(
            "[{}/{}] #{i} {prompt}: {} ({:.1} s/prompt)",
            done + 1,
            prompts.len(),
            if missed.is_empty() {
                "ok".to_string()
            } else {
                format!("missed {}", missed.join(", "))
            },
            started.elapsed().as_secs_f32() / (done + 1) as f32
        );
        if let Some(dir) = &args.out_dir {
            let strip: Vec<u8> = (0..h)
                .flat_map(|y| frames.iter().flat_map(move |f| f[3 * y * w..3 * (y + 1) * w].iter().copied()))
                .collect();
            let file = dir.join(format!("{i:03}.png"));
            write_rgb(&file, &strip, w * frames.len(), h)?;
        }
        entries.push(entry);
        scores.push(s);
    }
    let header = format!(
        "{} prompts from {}, {} backend, {} steps:",
        prompts.len(),
        prompts_path.display(),
        render.backend_name(),
        args.steps
    );
    let about = serde_json::json!({"model": args.model, "backend": render.backend_name(), "steps": args.steps});
    summarise(&header, &scores, about, entries, args.out_dir.as_deref())
}

/// Scores again the pictures a run kept in `dir` (its `--out-dir`: report.json and one PNG
/// per prompt, a clip's square frames side by side), so a revised checker needs no new
/// generation.
fn rescore(g: &Grammar, dir: &Path, out_dir: Option<&Path>) -> Result<()> {
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let kept: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let items = kept["prompts"]
        .as_array()
        .with_context(|| format!("{}: no `prompts` list", path.display()))?;
    let (mut scores, mut entries) = (Vec::new(), Vec::new());
    for (k, item) in items.iter().enumerate() {
        let prompt = item["prompt"]
            .as_str()
            .with_context(|| format!("{}: prompts[{k}] has no `prompt`", path.display()))?;
        let seed = item["seed"]
            .as_u64()
            .with_context(|| format!("{}: prompts[{k}] has no `seed`", path.display()))? as usize;
        let file = dir.join(format!("{seed:03}.png"));
        let (rgb, w, h) = read_rgb(&file)?;
        if h == 0 || w % h != 0 {
            bail!("{}: {w}x{h} is not a row of square frames", file.display());
        }
        let (s, entry) = judge(g, &parse(g, prompt)?, prompt, seed, &split_strip(&rgb, w, h, w / h), h, h);
        scores.push(s);
        entries.push(entry);
    }
    let header = format!(
        "{} kept pictures in {} ({} backend, {} steps), scored again:",
        items.len(),
        dir.display(),
        kept["backend"].as_str().unwrap_or("unknown"),
        kept["steps"]
    );
    let about = serde_json::json!({"model": kept["model"], "backend": kept["backend"], "steps": kept["steps"], "rescored_from": dir});
    summarise(&header, &scores, about, entries, out_dir)
}

/// One picture or clip against what its prompt asks, and its entry for report.json.
fn judge(g: &Grammar, e: &Expected, prompt: &str, seed: usize, frames: &[Vec<u8>], w: usize, h: usize) -> (Score, Value) {
    let observed = observe(g, frames, w, h);
    let s = score(e, &observed);
    let entry = serde_json::json!({
        "prompt": prompt,
        "seed": seed,
        "observed": format!("{observed:?}"),
        "missed": misses(&s),
    });
    (s, entry)
}

fn misses(s: &Score) -> Vec<&'static str> {
    ATTRIBUTES.iter().copied().filter(|a| s.get(a) == Some(false)).collect()
}

/// Prints the per-attribute table and, given `out_dir`, writes it with `about` and every
/// prompt's entry to report.json there.
fn summarise(header: &str, scores: &[Score], about: Value, entries: Vec<Value>, out_dir: Option<&Path>) -> Result<()> {
    println!("{header}");
    let table = tally(scores);
    for (attribute, ok, asked) in &table {
        if *asked > 0 {
            println!("  {attribute:<10} {ok:>4}/{asked:<4} {:5.1}%", 100.0 * *ok as f32 / *asked as f32);
        }
    }
    if let Some(dir) = out_dir {
        let mut json = about;
        json["accuracy"] = table
            .iter()
            .filter(|t| t.2 > 0)
            .map(|(a, ok, asked)| (a.to_string(), serde_json::json!({"correct": ok, "asked": asked})))
            .collect::<serde_json::Map<String, Value>>()
            .into();
        json["prompts"] = entries.into();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = dir.join("report.json");
        std::fs::write(&file, serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(())
}

fn write_rgb(path: &Path, rgb: &[u8], w: usize, h: usize) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(rgb)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenes_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/scenes")
    }

    /// The scene generator's own renders (train/scenes.py writes them with their captions),
    /// each frame box-blurred over `blur` x `blur` pixels (1: as drawn); every attribute
    /// must be read back (but colour, once blurred).
    fn assert_reads_back_the_generators_scenes(blur: usize) {
        let g = Grammar::load();
        let list: Value = serde_json::from_str(&std::fs::read_to_string(scenes_dir().join("scenes.json")).unwrap()).unwrap();
        let mut scores = Vec::new();
        for item in list.as_array().unwrap() {
            let count = item["frames"].as_u64().unwrap() as usize;
            let caption = item["caption"].as_str().unwrap();
            let (rgb, w, h) = read_rgb(&scenes_dir().join(item["file"].as_str().unwrap())).unwrap();
            let frames: Vec<Vec<u8>> = split_strip(&rgb, w, h, count)
                .iter()
                .map(|f| box_blur(f, w / count, h, blur))
                .collect();
            let observed = observe(&g, &frames, w / count, h);
            let s = score(&parse(&g, caption).unwrap(), &observed);
            // Blur mixes a thin object's pixels with the background's, so its colour may
            // truly read as another palette colour; its outline may not change.
            for a in ATTRIBUTES.into_iter().filter(|a| blur == 1 || *a != "colour") {
                assert_ne!(s.get(a), Some(false), "{caption}, blur {blur}: {a} wrong, observed {observed:?}");
            }
            scores.push(s);
        }
        let table = tally(&scores);
        assert!(table.iter().all(|(_, _, asked)| *asked >= 10), "every attribute asked: {table:?}");
    }

    /// Mean over a `k` x `k` window (odd `k`), the picture's edge repeated outwards.
    fn box_blur(rgb: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
        let half = (k / 2) as isize;
        let at = |x: isize, y: isize, c: usize| {
            let (x, y) = (x.clamp(0, w as isize - 1) as usize, y.clamp(0, h as isize - 1) as usize);
            rgb[3 * (y * w + x) + c] as f32
        };
        (0..w * h * 3)
            .map(|i| {
                let (p, c) = (i / 3, i % 3);
                let (x, y) = ((p % w) as isize, (p / w) as isize);
                let sum: f32 = (-half..=half)
                    .flat_map(|dy| (-half..=half).map(move |dx| (dx, dy)))
                    .map(|(dx, dy)| at(x + dx, y + dy, c))
                    .sum();
                (sum / (k * k) as f32).round() as u8
            })
            .collect()
    }

    #[test]
    fn reads_back_every_attribute_of_the_generators_scenes() {
        assert_reads_back_the_generators_scenes(1);
    }

    /// A model draws softer edges and blunter points than the generator; a 3x3 blur is a
    /// stand-in for that, and once read stars as crosses and squares as circles.
    #[test]
    fn reads_back_every_attribute_of_blurred_scenes() {
        assert_reads_back_the_generators_scenes(3);
    }

    /// A kept run (report.json and one PNG per seed) is scored again from its files; a
    /// picture gone missing is an error naming it.
    #[test]
    fn rescores_the_pictures_a_run_kept() {
        let dir = std::env::temp_dir().join(format!("sdlite-rescore-test-{}", std::process::id()));
        let (kept, again) = (dir.join("kept"), dir.join("again"));
        std::fs::create_dir_all(&kept).unwrap();
        let list: Value = serde_json::from_str(&std::fs::read_to_string(scenes_dir().join("scenes.json")).unwrap()).unwrap();
        let prompts: Vec<Value> = list.as_array().unwrap()[58..62]
            .iter()
            .enumerate()
            .map(|(seed, item)| {
                std::fs::copy(
                    scenes_dir().join(item["file"].as_str().unwrap()),
                    kept.join(format!("{seed:03}.png")),
                )
                .unwrap();
                serde_json::json!({"prompt": item["caption"], "seed": seed})
            })
            .collect();
        assert!(
            list.as_array().unwrap()[58..62].iter().any(|i| i["frames"].as_u64() > Some(1)),
            "a clip among them"
        );
        let report = serde_json::json!({"model": "m", "backend": "b", "steps": 3, "prompts": prompts});
        std::fs::write(kept.join("report.json"), report.to_string()).unwrap();
        rescore(&Grammar::load(), &kept, Some(&again)).unwrap();
        let out: Value = serde_json::from_str(&std::fs::read_to_string(again.join("report.json")).unwrap()).unwrap();
        assert_eq!((out["backend"].as_str(), out["steps"].as_u64()), (Some("b"), Some(3)));
        for (attribute, counts) in out["accuracy"].as_object().unwrap() {
            assert_eq!(counts["correct"], counts["asked"], "{attribute}: {out}");
        }
        assert_eq!(out["accuracy"]["shape"]["asked"], 4);
        std::fs::remove_file(kept.join("001.png")).unwrap();
        let err = format!("{:#}", rescore(&Grammar::load(), &kept, None).unwrap_err());
        assert!(err.contains("001.png"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parses_the_caption_grammar_and_refuses_other_text() {
        let g = Grammar::load();
        let e = parse(&g, "three small orange crosses on a green background").unwrap();
        assert_eq!(
            (e.count, e.colour.as_str(), e.shape.as_str(), e.background.as_str()),
            (3, "orange", "cross", "green")
        );
        let e = parse(&g, "A red star on a yellow background, top left").unwrap();
        assert_eq!((e.count, e.shape.as_str(), e.position.as_deref()), (1, "star", Some("top left")));
        let e = parse(&g, "a white square on a black background, moving up").unwrap();
        assert_eq!(e.motion.as_deref(), Some("up"));
        assert!(parse(&g, "a lighthouse at dusk").is_err());
        assert!(parse(&g, "a red star").is_err());
    }

    #[test]
    fn a_blank_picture_has_no_objects_and_fails_every_object_attribute() {
        let g = Grammar::load();
        let rgb: Vec<u8> = std::iter::repeat_n([40u8, 80, 220], 64 * 64).flatten().collect();
        let o = observe_picture(&g, &rgb, 64, 64);
        assert_eq!(o.background, "blue");
        let s = score(&parse(&g, "a red star on a blue background, top left").unwrap(), &o);
        assert_eq!(
            (s.colour, s.shape, s.position, s.background),
            (Some(false), Some(false), Some(false), Some(true))
        );
    }
}
