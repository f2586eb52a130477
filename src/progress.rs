//! What `farm build` shows while it runs: a live view per platform on a terminal, one prefixed
//! line per event otherwise, or JSON for scripts. Presentation only.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use shared::proto::{BuildEvent, PlatformResult};
use shared::Platform;

use crate::cli::Progress;

pub enum View {
    Plain,
    Json,
    Live { multi: MultiProgress, bars: HashMap<Platform, ProgressBar> },
}

impl View {
    pub fn new(mode: Progress, platforms: &[Platform]) -> View {
        match mode {
            Progress::Json => View::Json,
            Progress::Plain => View::Plain,
            Progress::Auto if !std::io::stderr().is_terminal() => View::Plain,
            Progress::Auto => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
                let width = platforms.iter().map(|p| p.to_string().len()).max().unwrap_or(0);
                let style = ProgressStyle::with_template(&format!(
                    "{{spinner}} {{prefix:<{width}}} {{elapsed:>4}} {{wide_msg}}"
                ))
                .expect("a valid template");
                let bars = platforms
                    .iter()
                    .map(|p| {
                        let bar =
                            multi.add(ProgressBar::new_spinner().with_style(style.clone()).with_prefix(p.to_string()));
                        bar.enable_steady_tick(Duration::from_millis(120));
                        bar.set_message("queued");
                        (p.clone(), bar)
                    })
                    .collect();
                View::Live { multi, bars }
            }
        }
    }

    /// A line about the build as a whole.
    pub fn note(&self, line: &str) {
        match self {
            View::Json => {}
            View::Plain => eprintln!("{line}"),
            View::Live { multi, .. } => {
                let _ = multi.println(line);
            }
        }
    }

    pub fn event(&mut self, e: &BuildEvent) {
        match self {
            View::Json => println!("{}", serde_json::to_string(e).expect("events serialise")),
            View::Plain => {
                if let Some((p, line)) = e.describe() {
                    eprintln!("[{p}] {line}");
                }
            }
            View::Live { bars, .. } => {
                let Some((p, line)) = e.describe() else { return };
                let Some(bar) = bars.get(&p) else { return };
                match e {
                    BuildEvent::PlatformDone(_) => bar.finish_with_message(line),
                    BuildEvent::PlatformFailed { .. } => bar.abandon_with_message(line),
                    _ => bar.set_message(line),
                }
            }
        }
    }

    pub fn finish(&self) {
        if let View::Live { bars, .. } = self {
            for bar in bars.values().filter(|b| !b.is_finished()) {
                bar.abandon();
            }
        }
    }
}

pub fn mode(r: &PlatformResult) -> &'static str {
    if r.cached {
        "cached"
    } else if r.emulated {
        "emulated"
    } else {
        "native"
    }
}
