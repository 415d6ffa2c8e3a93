//! The built-in model end to end: `sdlite gen` with no `--model` draws what the prompt
//! asks (read back by the fidelity checker), and `sdlite fidelity` scores a subset of the
//! held-out prompts. CPU backend; the full set and the wgpu figures are in
//! docs/tiny-models.md.

mod common;

use common::sdlite;

fn text(out: &std::process::Output) -> String {
    assert!(out.status.success(), "sdlite failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn gen_without_a_model_draws_the_prompt() {
    let png = std::env::temp_dir().join(format!("sdlite-default-{}.png", std::process::id()));
    let prompt = "a red star on a yellow background";
    let home = std::env::temp_dir().join(format!("sdlite-default-cache-{}", std::process::id()));
    let out = common::sdlite_env(
        &[
            "gen",
            "--prompt",
            prompt,
            "--seed",
            "1",
            "--backend",
            "cpu",
            "--out",
            png.to_str().unwrap(),
        ],
        &[("XDG_CACHE_HOME", home.to_str().unwrap())],
    );
    text(&out);
    let report = text(&sdlite(&["fidelity", "--image", png.to_str().unwrap(), "--prompt", prompt]));
    for attribute in ["colour", "shape", "background", "count"] {
        assert!(report.contains(&format!("{attribute}: ok")), "{attribute} not as asked:\n{report}");
    }
    let _ = std::fs::remove_file(png);
    let _ = std::fs::remove_dir_all(home);
}

/// Six held-out prompts (unseen colour/shape/background combinations): the colours and
/// backgrounds must all be right and most shapes (the full set: 100% and 85%).
#[test]
fn fidelity_on_held_out_prompts() {
    let report = text(&sdlite(&["fidelity", "--limit", "6", "--backend", "cpu"]));
    let correct = |attribute: &str| -> usize {
        let line = report
            .lines()
            .find(|l| l.trim_start().starts_with(attribute))
            .unwrap_or_else(|| panic!("no {attribute} in:\n{report}"));
        line.split_whitespace()
            .nth(1)
            .and_then(|f| f.split('/').next())
            .and_then(|n| n.parse().ok())
            .expect("n/m")
    };
    assert_eq!(correct("colour"), 6, "{report}");
    assert_eq!(correct("background"), 6, "{report}");
    assert!(correct("shape") >= 4, "{report}");
}
