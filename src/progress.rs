//! What `farm build` shows while it runs: a live view per platform on a terminal, one prefixed
//! line per event otherwise, or JSON for scripts. Presentation only.
//!
//! The live view is a [`Board`] (what is known about each platform, updated by events, with time
//! passed in) rendered into lines by a pure function, and a small terminal writer that replaces
//! the previous frame in place. The cursor rests at the start of the line below the frame, so a
//! `^C` echoed by the terminal lands on that line and the next (final) frame still replaces the
//! rows it drew instead of repeating them. Autowrap is off while a frame is written, so a line
//! wider than the terminal is cut instead of wrapped (a wrapped line would break the count).

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use shared::proto::{BuildEvent, PlatformResult};
use shared::Platform;

use crate::cli::Progress;

/// Log lines shown under each running platform unless `FARM_PROGRESS_LINES` says otherwise.
pub const DEFAULT_TAIL_LINES: usize = 3;
const MAX_TAIL_LINES: usize = 50;
/// How often the live view redraws (elapsed times tick) and re-reads the terminal's size.
const TICK: Duration = Duration::from_millis(100);
const SIZE_EVERY: Duration = Duration::from_secs(1);

pub enum View {
    Plain { start: Instant },
    Json { start: Instant },
    Live(Live),
}

/// How progress is shown: decided from the flag and the terminal, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Live,
    Plain,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    pub kind: Kind,
    /// ANSI colours: only in the live view, and never when `NO_COLOR` is set (to anything).
    pub colour: bool,
}

/// `--progress`, whether stderr is a terminal, `TERM` and `NO_COLOR` into what is shown. A dumb
/// terminal cannot move its cursor, so it gets plain lines.
pub fn decide(mode: Progress, stderr_tty: bool, term: Option<&str>, no_color: Option<&str>) -> Look {
    let kind = match mode {
        Progress::Json => Kind::Json,
        Progress::Plain => Kind::Plain,
        Progress::Auto if !stderr_tty || term == Some("dumb") => Kind::Plain,
        Progress::Auto => Kind::Live,
    };
    let colour = kind == Kind::Live && no_color.is_none_or(str::is_empty);
    Look { kind, colour }
}

/// `FARM_PROGRESS_LINES`: how many of a platform's last log lines the live view shows.
pub fn tail_lines(value: Option<&str>) -> Result<usize> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT_TAIL_LINES),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n <= MAX_TAIL_LINES => Ok(n),
            _ => bail!(
                "FARM_PROGRESS_LINES={v:?} is not a number of log lines from 0 to {MAX_TAIL_LINES}; set it to one (0 hides log lines) or unset it for {DEFAULT_TAIL_LINES}"
            ),
        },
    }
}

impl View {
    pub fn new(mode: Progress, platforms: &[Platform]) -> Result<View> {
        let start = Instant::now();
        let env = |k: &str| std::env::var(k).ok();
        let look = decide(mode, std::io::stderr().is_terminal(), env("TERM").as_deref(), env("NO_COLOR").as_deref());
        let tail = tail_lines(env("FARM_PROGRESS_LINES").as_deref())?;
        Ok(match look.kind {
            Kind::Json => View::Json { start },
            Kind::Plain => View::Plain { start },
            Kind::Live => View::Live(Live::start(Board::new(platforms, tail, start), look.colour)),
        })
    }

    /// A line about the build as a whole.
    pub fn note(&self, line: &str) {
        match self {
            View::Json { .. } => {}
            View::Plain { .. } => eprintln!("{line}"),
            View::Live(live) => live.note(line),
        }
    }

    pub fn event(&mut self, e: &BuildEvent) {
        match self {
            View::Json { .. } => println!("{}", serde_json::to_string(e).expect("events serialise")),
            View::Plain { .. } => {
                if let Some((p, line)) = e.describe() {
                    eprintln!("[{p}] {line}");
                }
            }
            View::Live(live) => live.event(e),
        }
    }

    /// Draws the final frame once and leaves it on the screen; nothing is drawn after. Safe to
    /// call more than once.
    pub fn finish(&mut self) {
        if let View::Live(live) = self {
            live.finish();
        }
    }

    /// Wall time since the view was made (just before the context upload).
    pub fn elapsed(&self) -> Duration {
        match self {
            View::Plain { start } | View::Json { start } => start.elapsed(),
            View::Live(live) => live.elapsed(),
        }
    }
}

pub fn mode(r: &PlatformResult) -> &'static str {
    r.mode()
}

/// The step a builder's log line announces, as `[2/5] RUN make`: buildah's `STEP 2/5: RUN make`
/// (with a `[1/2] ` stage prefix in multi-stage builds), BuildKit's `#5 [2/5] RUN make` and
/// `#5 [build 2/5] RUN make`, and the classic docker builder's `Step 2/5 : RUN make`.
pub fn parse_step(line: &str) -> Option<String> {
    let line = line.trim();
    let step = |frac: &str, instr: &str| is_fraction(frac).then(|| format!("[{frac}] {}", instr.trim()));
    if let Some(rest) = line.strip_prefix('#') {
        let (num, rest) = rest.split_once(' ')?;
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (inside, instr) = rest.strip_prefix('[')?.split_once("] ")?;
        return step(inside.rsplit(' ').next()?, instr);
    }
    if let Some(rest) = line.strip_prefix("Step ") {
        let (frac, instr) = rest.split_once(" : ")?;
        return step(frac, instr);
    }
    let unstaged = match line.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((stage, rest)) if is_fraction(stage) => rest,
        _ => line,
    };
    let (frac, instr) = unstaged.strip_prefix("STEP ")?.split_once(": ")?;
    step(frac, instr)
}

fn is_fraction(s: &str) -> bool {
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    s.split_once('/').is_some_and(|(a, b)| digits(a) && digits(b))
}

/// A log line fit for a terminal: escape sequences and control characters removed, tabs as spaces.
fn sanitise(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ params final(0x40..=0x7e); OSC: ESC ] text BEL (or ESC \\); anything
                // else: ESC and the next char.
                match chars.next() {
                    Some('[') => {
                        for c in chars.by_ref() {
                            if ('\x40'..='\x7e').contains(&c) {
                                break;
                            }
                        }
                    }
                    Some(']') => {
                        while let Some(c) = chars.next() {
                            if c == '\x07' || (c == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                                break;
                            }
                        }
                    }
                    _ => {}
                }
            }
            '\t' => out.push_str("    "),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// No word yet from the coordinator, or waiting for an agent (the coordinator's reason).
    Queued(Option<String>),
    Retrying(String),
    Running {
        agent: String,
        emulated: bool,
        attempt: u32,
    },
    Done {
        agent: String,
        emulated: bool,
    },
    Cached,
    Failed(String),
}

#[derive(Debug)]
struct Row {
    platform: Platform,
    state: State,
    step: Option<String>,
    lines: VecDeque<String>,
    /// Time spent queued before the current attempt started (all attempts' queueing).
    queued: Duration,
    queued_since: Option<Instant>,
    started: Option<Instant>,
    ended: Option<Instant>,
}

impl Row {
    fn queue_time(&self, now: Instant) -> Duration {
        self.queued + self.queued_since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Its own time: since its (latest) `Started`, frozen when it ends.
    fn own_time(&self, now: Instant) -> Option<Duration> {
        let start = self.started?;
        Some(self.ended.unwrap_or(now).saturating_duration_since(start))
    }

    fn stop_queue(&mut self, now: Instant) {
        if let Some(t) = self.queued_since.take() {
            self.queued += now.saturating_duration_since(t);
        }
    }
}

/// What the live view knows about each platform. Pure: events and times in, lines out.
#[derive(Debug)]
pub struct Board {
    start: Instant,
    ended: Option<Instant>,
    tail: usize,
    rows: Vec<Row>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Paint {
    None,
    Bold,
    Dim,
    Green,
    Red,
    Yellow,
    Cyan,
}

impl Paint {
    fn code(self) -> &'static str {
        match self {
            Paint::None => "",
            Paint::Bold => "\x1b[1m",
            Paint::Dim => "\x1b[2m",
            Paint::Green => "\x1b[32m",
            Paint::Red => "\x1b[31m",
            Paint::Yellow => "\x1b[33m",
            Paint::Cyan => "\x1b[36m",
        }
    }
}

const SPINNER: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// `text` in at most `n` characters: cut with `…`, or nothing when even that would not say much.
fn cut(text: &str, n: usize) -> String {
    match text.chars().count() {
        len if len <= n => text.to_string(),
        _ if n < 4 => String::new(),
        _ => text.chars().take(n - 1).chain(['…']).collect(),
    }
}

/// `pieces` on one line of at most `width` characters (the last piece that does not fit is cut
/// with `…`), each in its colour if `colour`.
fn fit(pieces: &[(String, Paint)], width: usize, colour: bool) -> String {
    let mut out = String::new();
    let mut left = width;
    for (text, paint) in pieces {
        if left == 0 {
            break;
        }
        let n = text.chars().count();
        let shown: String =
            if n <= left { text.clone() } else { text.chars().take(left.saturating_sub(1)).chain(['…']).collect() };
        left -= shown.chars().count().min(left);
        if colour && *paint != Paint::None && !shown.is_empty() {
            out += paint.code();
            out += &shown;
            out += "\x1b[0m";
        } else {
            out += &shown;
        }
    }
    out
}

impl Board {
    pub fn new(platforms: &[Platform], tail: usize, now: Instant) -> Board {
        let rows = platforms
            .iter()
            .map(|p| Row {
                platform: p.clone(),
                state: State::Queued(None),
                step: None,
                lines: VecDeque::new(),
                queued: Duration::ZERO,
                queued_since: Some(now),
                started: None,
                ended: None,
            })
            .collect();
        Board { start: now, ended: None, tail, rows }
    }

    pub fn apply(&mut self, e: &BuildEvent, now: Instant) {
        let platform = match e {
            BuildEvent::Waiting { platform, .. }
            | BuildEvent::Started { platform, .. }
            | BuildEvent::Log { platform, .. }
            | BuildEvent::Retrying { platform, .. }
            | BuildEvent::PlatformFailed { platform, .. } => platform,
            BuildEvent::PlatformDone(r) => &r.platform,
            BuildEvent::Succeeded { .. } | BuildEvent::Failed { .. } | BuildEvent::Cancelled => {
                self.end(now);
                return;
            }
        };
        let tail = self.tail;
        let Some(row) = self.rows.iter_mut().find(|r| &r.platform == platform) else { return };
        match e {
            BuildEvent::Waiting { reason, .. } => row.state = State::Queued(Some(reason.clone())),
            BuildEvent::Started { agent, emulated, attempt, .. } => {
                row.stop_queue(now);
                row.started = Some(now);
                row.step = None;
                row.lines.clear();
                row.state = State::Running { agent: agent.clone(), emulated: *emulated, attempt: *attempt };
            }
            BuildEvent::Log { line, .. } => {
                let line = sanitise(line);
                if let Some(step) = parse_step(&line) {
                    row.step = Some(step);
                }
                row.lines.push_back(line);
                while row.lines.len() > tail {
                    row.lines.pop_front();
                }
            }
            BuildEvent::Retrying { reason, .. } => {
                row.queued_since = Some(now);
                row.started = None;
                row.state = State::Retrying(reason.clone());
            }
            BuildEvent::PlatformDone(r) => {
                row.stop_queue(now);
                row.ended = Some(now);
                row.state =
                    if r.cached { State::Cached } else { State::Done { agent: r.agent.clone(), emulated: r.emulated } };
            }
            BuildEvent::PlatformFailed { error, .. } => {
                row.stop_queue(now);
                row.ended = Some(now);
                row.state = State::Failed(error.clone());
            }
            BuildEvent::Succeeded { .. } | BuildEvent::Failed { .. } | BuildEvent::Cancelled => {}
        }
    }

    /// The build is over (or no longer followed): every clock stops.
    pub fn end(&mut self, now: Instant) {
        self.ended.get_or_insert(now);
        for row in &mut self.rows {
            row.stop_queue(now);
            row.ended.get_or_insert(now);
        }
    }

    pub fn elapsed(&self, now: Instant) -> Duration {
        self.ended.unwrap_or(now).saturating_duration_since(self.start)
    }

    /// The frame at `now` in at most `height` lines of at most `width` characters: a header,
    /// then per platform its row and, while it runs, its last log lines. When it does not fit,
    /// log lines go first, then platforms (counted on the last line).
    pub fn render(&self, now: Instant, width: usize, height: usize, colour: bool) -> Vec<String> {
        let height = height.max(2);
        let mut tail = self.tail;
        loop {
            let lines = self.render_with(now, width, tail, colour);
            if lines.len() <= height || tail == 0 {
                if lines.len() <= height {
                    return lines;
                }
                // Rows alone do not fit either: as many as fit, and how many are not shown.
                let mut lines = lines;
                let hidden = lines.len() - (height - 1);
                lines.truncate(height - 1);
                lines.push(fit(&[(format!("… and {hidden} more platforms"), Paint::Dim)], width, colour));
                return lines;
            }
            tail -= 1;
        }
    }

    fn render_with(&self, now: Instant, width: usize, tail: usize, colour: bool) -> Vec<String> {
        let done = self.rows.iter().filter(|r| matches!(r.state, State::Done { .. } | State::Cached)).count();
        let failed = self.rows.iter().filter(|r| matches!(r.state, State::Failed(_))).count();
        let mut summary = format!("{done}/{} done", self.rows.len());
        if failed > 0 {
            summary += &format!(", {failed} failed");
        }
        let head = format!("[+] Building {} ({summary})", secs(self.elapsed(now)));
        let mut out = vec![fit(&[(head, Paint::Bold)], width, colour)];
        let name_width = self.rows.iter().map(|r| r.platform.to_string().len()).max().unwrap_or(0);
        let frame = (now.saturating_duration_since(self.start).as_millis() / TICK.as_millis()) as usize;
        for row in &self.rows {
            let mode = |emulated: bool| if emulated { "emulated" } else { "native" };
            let (glyph, paint, state) = match &row.state {
                State::Queued(None) => ('·', Paint::Yellow, "queued".to_string()),
                State::Queued(Some(reason)) => ('·', Paint::Yellow, format!("queued: {reason}")),
                State::Retrying(reason) => ('↻', Paint::Yellow, format!("retrying: {reason}")),
                State::Running { agent, emulated, attempt } => {
                    let again = if *attempt > 1 { format!(", attempt {attempt}") } else { String::new() };
                    let glyph = if self.ended.is_some() { '■' } else { SPINNER[frame % SPINNER.len()] };
                    (glyph, Paint::Cyan, format!("running on {agent} ({}{again})", mode(*emulated)))
                }
                State::Done { agent, emulated } => {
                    ('✔', Paint::Green, format!("done on {agent} ({})", mode(*emulated)))
                }
                State::Cached => ('✔', Paint::Green, "cached".to_string()),
                State::Failed(error) => ('✘', Paint::Red, format!("failed: {error}")),
            };
            let queued = row.queue_time(now);
            let time = match row.own_time(now) {
                Some(own) => format!("{} (queued {})", secs(own), secs(queued)),
                None => format!("queued {}", secs(queued)),
            };
            let running = matches!(row.state, State::Running { .. });
            let step = match (&row.step, running || matches!(row.state, State::Failed(_))) {
                (Some(step), true) => format!("  {step}"),
                _ => String::new(),
            };
            // The time sits at the right edge; the step, then the state, are cut to make room.
            let lead = format!(" {glyph} ");
            let name = format!("{:<name_width$}  ", row.platform.to_string());
            let len = |s: &str| s.chars().count();
            let room = width.saturating_sub(len(&lead) + len(&name) + 2 + len(&time));
            let state = cut(&state, room);
            let step = cut(&step, room - len(&state));
            let used = len(&lead) + len(&name) + len(&state) + len(&step) + len(&time);
            let gap = width.saturating_sub(used).max(2);
            out.push(fit(
                &[
                    (lead, paint),
                    (name, Paint::Bold),
                    (state, paint),
                    (step, Paint::None),
                    (" ".repeat(gap), Paint::None),
                    (time, Paint::Dim),
                ],
                width,
                colour,
            ));
            if running {
                let skip = row.lines.len().saturating_sub(tail);
                for line in row.lines.iter().skip(skip) {
                    out.push(fit(&[(format!("     {line}"), Paint::Dim)], width, colour));
                }
            }
        }
        out
    }
}

/// What the terminal writer and its ticking thread share.
struct Screen {
    board: Board,
    colour: bool,
    width: usize,
    height: usize,
    /// Lines of the frame on the screen (the cursor is at the start of the line below it).
    drawn: usize,
    finished: bool,
}

impl Screen {
    /// Replaces the frame on the screen with the frame at `now`, after printing `above` (if any)
    /// where the frame was, so it scrolls up with the terminal's history.
    fn draw(&mut self, now: Instant, above: Option<&str>) {
        let lines =
            self.board.render(now, self.width.saturating_sub(1).max(1), self.height.saturating_sub(1), self.colour);
        let mut s = String::from("\x1b[?7l\r");
        if self.drawn > 0 {
            s += &format!("\x1b[{}A", self.drawn);
        }
        // Old lines are overwritten, each cleared to its end, never the screen at once: some
        // terminals (tmux) push a whole cleared screen into the history, which would repeat it.
        if let Some(above) = above {
            s += "\x1b[?7h";
            s += above;
            s += "\x1b[K\n\x1b[?7l";
        }
        for line in &lines {
            s += line;
            s += "\x1b[K\n";
        }
        s += "\x1b[J\x1b[?7h";
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(s.as_bytes());
        let _ = err.flush();
        self.drawn = lines.len();
    }
}

/// The live view: a [`Board`] on the terminal, redrawn every [`TICK`] by its own thread.
pub struct Live {
    screen: Arc<Mutex<Screen>>,
    stop: Option<mpsc::Sender<()>>,
    ticker: Option<JoinHandle<()>>,
}

impl Live {
    fn start(board: Board, colour: bool) -> Live {
        let (width, height) = term_size().unwrap_or((80, 24));
        let screen = Arc::new(Mutex::new(Screen { board, colour, width, height, drawn: 0, finished: false }));
        screen.lock().unwrap().draw(Instant::now(), None);
        let (stop, stopped) = mpsc::channel::<()>();
        let shared = screen.clone();
        let ticker = std::thread::spawn(move || {
            let mut sized = Instant::now();
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                let size = if sized.elapsed() >= SIZE_EVERY {
                    sized = Instant::now();
                    term_size()
                } else {
                    None
                };
                let mut s = shared.lock().unwrap();
                if s.finished {
                    return;
                }
                if let Some((w, h)) = size {
                    (s.width, s.height) = (w, h);
                }
                s.draw(Instant::now(), None);
            }
        });
        Live { screen, stop: Some(stop), ticker: Some(ticker) }
    }

    fn note(&self, line: &str) {
        let mut s = self.screen.lock().unwrap();
        if s.finished {
            eprintln!("{line}");
        } else {
            s.draw(Instant::now(), Some(line));
        }
    }

    fn event(&self, e: &BuildEvent) {
        // Drawn by the ticker: a builder printing thousands of lines a second costs no more.
        self.screen.lock().unwrap().board.apply(e, Instant::now());
    }

    fn finish(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        let mut s = self.screen.lock().unwrap();
        if s.finished {
            return;
        }
        let now = Instant::now();
        s.board.end(now);
        s.draw(now, None);
        s.finished = true;
    }

    fn elapsed(&self) -> Duration {
        self.screen.lock().unwrap().board.elapsed(Instant::now())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The terminal's (columns, rows), asked of `stty` on stderr's terminal.
fn term_size() -> Option<(usize, usize)> {
    use std::os::fd::AsFd;
    let tty = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let out = std::process::Command::new("stty")
        .arg("size")
        .stdin(std::process::Stdio::from(tty))
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut it = text.split_whitespace().map(str::parse::<usize>);
    match (it.next(), it.next()) {
        (Some(Ok(rows)), Some(Ok(cols))) if rows > 0 && cols > 0 => Some((cols, rows)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::proto::ManifestRef;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn steps_from_buildah_buildkit_and_docker_lines() {
        let cases = [
            ("STEP 2/5: RUN make", Some("[2/5] RUN make")),
            ("[1/2] STEP 3/6: COPY . .", Some("[3/6] COPY . .")),
            (
                "STEP 1/3: FROM 127.0.0.1:5000/busybox:latest AS build",
                Some("[1/3] FROM 127.0.0.1:5000/busybox:latest AS build"),
            ),
            ("#5 [2/5] RUN make", Some("[2/5] RUN make")),
            ("#12 [build 2/5] RUN make -j4", Some("[2/5] RUN make -j4")),
            ("Step 2/5 : RUN make", Some("[2/5] RUN make")),
            ("#5 [internal] load build definition from Dockerfile", None),
            ("#5 0.512 tick 1", None),
            ("#5 DONE 0.3s", None),
            ("STEP x/5: RUN make", None),
            ("echo STEP 2/5: RUN make", None),
            ("tick 1", None),
            ("COMMIT 127.0.0.1:5000/app:1", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_step(line).as_deref(), want, "{line:?}");
        }
    }

    #[test]
    fn live_only_on_a_terminal_colour_only_without_no_color() {
        let live = |colour| Look { kind: Kind::Live, colour };
        let plain = Look { kind: Kind::Plain, colour: false };
        assert_eq!(decide(Progress::Auto, true, Some("xterm-256color"), None), live(true));
        assert_eq!(decide(Progress::Auto, true, None, None), live(true));
        assert_eq!(decide(Progress::Auto, true, Some("xterm"), Some("1")), live(false));
        assert_eq!(decide(Progress::Auto, true, Some("xterm"), Some("anything")), live(false));
        // NO_COLOR counts only when set to something (no-color.org).
        assert_eq!(decide(Progress::Auto, true, Some("xterm"), Some("")), live(true));
        assert_eq!(decide(Progress::Auto, false, Some("xterm"), None), plain);
        assert_eq!(decide(Progress::Auto, true, Some("dumb"), None), plain);
        assert_eq!(decide(Progress::Plain, true, Some("xterm"), None), plain);
        assert_eq!(decide(Progress::Json, true, Some("xterm"), None), Look { kind: Kind::Json, colour: false });
    }

    #[test]
    fn tail_lines_from_the_environment() {
        assert_eq!(tail_lines(None).unwrap(), 3);
        assert_eq!(tail_lines(Some("")).unwrap(), 3);
        assert_eq!(tail_lines(Some("0")).unwrap(), 0);
        assert_eq!(tail_lines(Some(" 10 ")).unwrap(), 10);
        assert_eq!(
            tail_lines(Some("lots")).unwrap_err().to_string(),
            "FARM_PROGRESS_LINES=\"lots\" is not a number of log lines from 0 to 50; set it to one (0 hides log lines) or unset it for 3"
        );
        assert!(tail_lines(Some("51")).is_err());
    }

    #[test]
    fn sanitised_lines_hold_no_escapes_or_controls() {
        assert_eq!(sanitise("\x1b[31mred\x1b[0m\tdone\r"), "red    done");
        assert_eq!(sanitise("a\x1b]0;title\x07b\x1b]8;;x\x1b\\c\x1bMd"), "abcd");
    }

    fn done(platform: &str, cached: bool) -> BuildEvent {
        BuildEvent::PlatformDone(PlatformResult {
            platform: p(platform),
            manifest: ManifestRef { digest: shared::Digest::of(b"m"), size: 1, media_type: String::new() },
            agent: "x86".into(),
            emulated: false,
            duration_ms: 1,
            cached,
            timings: vec![],
        })
    }

    #[test]
    fn each_platform_shows_its_state_step_own_time_queue_time_and_last_lines() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let platforms = [p("linux/amd64"), p("linux/arm64"), p("linux/arm/v7")];
        let mut b = Board::new(&platforms, 2, t0);
        let arm = p("linux/arm/v7");
        b.apply(
            &BuildEvent::Started { platform: p("linux/amd64"), agent: "x86".into(), emulated: false, attempt: 1 },
            at(300),
        );
        b.apply(
            &BuildEvent::Started { platform: p("linux/arm64"), agent: "x86".into(), emulated: true, attempt: 2 },
            at(1000),
        );
        b.apply(&BuildEvent::Waiting { platform: arm.clone(), reason: "waiting for an agent".into() }, at(200));
        for line in
            ["STEP 1/2: FROM busybox", "STEP 2/2: RUN for i in 1 2 3; do echo tick $i; done", "tick 1", "tick 2"]
        {
            b.apply(&BuildEvent::Log { platform: p("linux/amd64"), line: line.into() }, at(2000));
        }
        // A row: its text on the left, its time at the right edge of the 100 columns.
        let row = |left: &str, time: &str| format!("{left:<w$}{time}", w = 100 - time.chars().count());
        let frame = b.render(at(3400), 100, 50, false);
        let spin = SPINNER[34 % SPINNER.len()];
        let want = [
            "[+] Building 3.4s (0/3 done)".to_string(),
            row(
                &format!(" {spin} linux/amd64   running on x86 (native)  [2/2] RUN for i in 1 2 3; do echo tic…  "),
                "3.1s (queued 0.3s)",
            ),
            "     tick 1".into(),
            "     tick 2".into(),
            row(&format!(" {spin} linux/arm64   running on x86 (emulated, attempt 2)"), "2.4s (queued 1.0s)"),
            row(" · linux/arm/v7  queued: waiting for an agent", "queued 3.4s"),
        ];
        assert_eq!(frame, want);

        // Narrow: the step is cut shorter, the time stays at the right edge.
        let narrow = b.render(at(3400), 70, 50, false);
        assert_eq!(narrow[1], format!(" {spin} linux/amd64   running on x86 (native)  [2/2] R…  3.1s (queued 0.3s)"));
        assert!(narrow.iter().all(|l| l.chars().count() <= 70), "{narrow:#?}");
        // Short: log lines go before platforms do.
        assert_eq!(b.render(at(3400), 100, 4, false), [&*want[0], &want[1], &want[4], &want[5]]);
        // Shorter still: as many platforms as fit, and how many more there are.
        assert_eq!(b.render(at(3400), 100, 3, false), [&*want[0], &want[1], "… and 2 more platforms"]);

        // Done: its clock stops, its log lines fold away; the header counts it.
        b.apply(&done("linux/amd64", false), at(5000));
        b.apply(&done("linux/arm64", true), at(5000));
        b.apply(&BuildEvent::PlatformFailed { platform: arm, error: "no agent".into(), last_lines: vec![] }, at(6000));
        b.apply(&BuildEvent::Failed { error: "x".into() }, at(6000));
        let frame = b.render(at(9000), 100, 50, false);
        let want = [
            "[+] Building 6.0s (2/3 done, 1 failed)".to_string(),
            row(" ✔ linux/amd64   done on x86 (native)", "4.7s (queued 0.3s)"),
            row(" ✔ linux/arm64   cached", "4.0s (queued 1.0s)"),
            row(" ✘ linux/arm/v7  failed: no agent", "queued 6.0s"),
        ];
        assert_eq!(frame, want);
    }

    #[test]
    fn colour_only_when_asked() {
        let t0 = Instant::now();
        let b = Board::new(&[p("linux/amd64")], 3, t0);
        assert!(b.render(t0, 80, 24, false).iter().all(|l| !l.contains('\x1b')));
        assert!(b.render(t0, 80, 24, true)[1].contains("\x1b[33m"));
    }
}
