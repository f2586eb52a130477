//! Docker's `.dockerignore` rules, matched as moby matches them.

use super::ContextError;

/// Docker's .dockerignore semantics (moby's patternmatcher and dockerignore.ReadAll): one pattern per
/// line, lines starting with '#' are comments, blank lines are skipped, surrounding whitespace is
/// trimmed, a leading "/" is stripped and patterns are cleaned like Go's `filepath.Clean`; '*' and '?'
/// don't match '/', '**' matches any number of directories, `[...]` is a character class and '\'
/// escapes; a '!' prefix re-includes; the LAST matching pattern wins; a pattern matches a path if it
/// matches the path or any of its parent directories (excluding "dir" excludes everything under it).
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    exclusion: bool,
    matcher: Matcher,
}

/// moby compiles a pattern to one of four match types; the non-regexp ones compare the cleaned text
/// literally (so a '\' there is not an escape), which is kept here for fidelity.
#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Tokens(Vec<Tok>),
}

#[derive(Debug, Clone)]
enum Tok {
    Lit(char),
    /// `?`: one character other than '/'.
    Any,
    /// `*`: any run of characters other than '/'.
    Star,
    /// `**` followed by more pattern: `(.*/)?`, any number of leading directories.
    DirStar,
    /// `**` at the end: anything at all.
    Rest,
    Class(Class),
}

#[derive(Debug, Clone)]
struct Class {
    negated: bool,
    ranges: Vec<(char, char)>,
}

impl Class {
    fn matches(&self, c: char) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != self.negated
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum MatchType {
    Exact,
    Prefix,
    Suffix,
    Regexp,
}

impl Matcher {
    /// moby's `Pattern.compile`, producing tokens instead of a regexp.
    fn compile(pattern: &str) -> Result<Matcher, &'static str> {
        let chars: Vec<char> = pattern.chars().collect();
        let n = chars.len();
        let mut tokens = Vec::new();
        let mut mt = MatchType::Exact;
        let mut i = 0;
        let mut iteration = 0;
        while i < n {
            let c = chars[i];
            i += 1;
            match c {
                '*' if chars.get(i) == Some(&'*') => {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i == n {
                        if mt == MatchType::Exact {
                            mt = MatchType::Prefix;
                        } else {
                            tokens.push(Tok::Rest);
                            mt = MatchType::Regexp;
                        }
                    } else {
                        tokens.push(Tok::DirStar);
                        mt = MatchType::Regexp;
                    }
                    if iteration == 0 {
                        mt = MatchType::Suffix;
                    }
                }
                '*' => {
                    tokens.push(Tok::Star);
                    mt = MatchType::Regexp;
                }
                '?' => {
                    tokens.push(Tok::Any);
                    mt = MatchType::Regexp;
                }
                '\\' => match chars.get(i) {
                    Some(&next) => {
                        tokens.push(Tok::Lit(next));
                        i += 1;
                    }
                    None => tokens.push(Tok::Lit('\\')),
                },
                '[' => {
                    tokens.push(Tok::Class(parse_class(&chars, &mut i)?));
                    mt = MatchType::Regexp;
                }
                ']' => {
                    tokens.push(Tok::Lit(']'));
                    mt = MatchType::Regexp;
                }
                c => tokens.push(Tok::Lit(c)),
            }
            iteration += 1;
        }
        Ok(match mt {
            MatchType::Exact => Matcher::Exact(pattern.to_string()),
            MatchType::Prefix => Matcher::Prefix(pattern[..pattern.len() - 2].to_string()),
            MatchType::Suffix => Matcher::Suffix(pattern[2..].to_string()),
            MatchType::Regexp => Matcher::Tokens(tokens),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Exact(p) => path == p,
            Matcher::Prefix(p) => path.starts_with(p.as_str()),
            Matcher::Suffix(s) => path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|s| path == s),
            Matcher::Tokens(tokens) => run_tokens(tokens, &path.chars().collect::<Vec<_>>(), false),
        }
    }

    /// Whether some path starting with `prefix` could match.
    fn could_match_with_prefix(&self, prefix: &str) -> bool {
        match self {
            Matcher::Exact(p) => p.starts_with(prefix),
            Matcher::Prefix(p) => p.starts_with(prefix) || prefix.starts_with(p.as_str()),
            Matcher::Suffix(_) => true,
            Matcher::Tokens(tokens) => run_tokens(tokens, &prefix.chars().collect::<Vec<_>>(), true),
        }
    }
}

/// Parses a character class after its '[' (Go regexp syntax, which is what moby hands it to):
/// optional '^', a ']' first is literal, `a-z` ranges, '\' escapes.
fn parse_class(chars: &[char], i: &mut usize) -> Result<Class, &'static str> {
    const UNCLOSED: &str = "has a '[' without its closing ']'";
    let mut negated = false;
    if chars.get(*i) == Some(&'^') {
        negated = true;
        *i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    let one = |i: &mut usize| -> Result<char, &'static str> {
        let c = *chars.get(*i).ok_or(UNCLOSED)?;
        *i += 1;
        if c == '\\' {
            let c = *chars.get(*i).ok_or(UNCLOSED)?;
            *i += 1;
            return Ok(c);
        }
        Ok(c)
    };
    loop {
        match chars.get(*i) {
            None => return Err(UNCLOSED),
            Some(']') if !first => {
                *i += 1;
                return Ok(Class { negated, ranges });
            }
            Some('[') if chars.get(*i + 1) == Some(&':') => {
                return Err(
                    "uses a POSIX class like [:alpha:], which is not supported; list the characters or a range",
                );
            }
            _ => {}
        }
        first = false;
        let lo = one(i)?;
        let hi = if chars.get(*i) == Some(&'-') && chars.get(*i + 1).is_some_and(|&c| c != ']') {
            *i += 1;
            let hi = one(i)?;
            if hi < lo {
                return Err("has a character range whose end comes before its start");
            }
            hi
        } else {
            lo
        };
        ranges.push((lo, hi));
    }
}

/// Matches `s` against the tokens (a whole match), or with `prefix` set, tells whether `s` can be
/// extended into a match. Dynamic programming over (token, position): linear in both.
fn run_tokens(tokens: &[Tok], s: &[char], prefix: bool) -> bool {
    let n = s.len();
    // next[si]: can tokens[t + 1..] match s[si..]?
    let mut next: Vec<bool> = (0..=n).map(|si| si == n).collect();
    for tok in tokens.iter().rev() {
        let mut cur = vec![false; n + 1];
        // For DirStar: is there a '/' at some j >= si after which the rest matches?
        let mut slash_then_rest = false;
        for si in (0..=n).rev() {
            if si < n {
                slash_then_rest = slash_then_rest || (s[si] == '/' && next[si + 1]);
            }
            cur[si] = (prefix && si == n)
                || match tok {
                    Tok::Lit(c) => si < n && s[si] == *c && next[si + 1],
                    Tok::Any => si < n && s[si] != '/' && next[si + 1],
                    Tok::Class(class) => si < n && class.matches(s[si]) && next[si + 1],
                    Tok::Star => next[si] || (si < n && s[si] != '/' && cur[si + 1]),
                    Tok::Rest => next[si] || (si < n && cur[si + 1]),
                    Tok::DirStar => next[si] || slash_then_rest,
                };
        }
        next = cur;
    }
    next[0]
}

/// Go's `filepath.Clean` for '/'-separated paths.
pub(super) fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|last| *last != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    let body = out.join("/");
    if rooted {
        format!("/{body}")
    } else if body.is_empty() {
        ".".to_string()
    } else {
        body
    }
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Result<Self, ContextError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let mut pattern = line.trim();
            if pattern.is_empty() {
                continue;
            }
            let err =
                |reason| ContextError::IgnorePattern { line: index + 1, pattern: line.trim().to_string(), reason };
            let exclusion = pattern.starts_with('!');
            if exclusion {
                pattern = pattern[1..].trim();
                if pattern.is_empty() {
                    return Err(err("is a lone '!'; put the pattern to re-include after it"));
                }
            }
            let mut cleaned = clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let matcher = Matcher::compile(&cleaned).map_err(err)?;
            patterns.push(Pattern { exclusion, matcher });
        }
        Ok(DockerIgnore { patterns })
    }

    /// Whether `rel_path` (relative to the context root, '/'-separated) is left out of the context
    /// (moby's `MatchesOrParentMatches`).
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        let file = clean(rel_path);
        // The parent directories: "a" and "a/b" for "a/b/c".
        let parents: Vec<&str> = file.match_indices('/').map(|(i, _)| &file[..i]).collect();
        let mut matched = false;
        for pattern in &self.patterns {
            // An exclusion can only change an included path, an exception only an excluded one.
            if pattern.exclusion != matched {
                continue;
            }
            if pattern.matcher.matches(&file) || parents.iter().any(|p| pattern.matcher.matches(p)) {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// Whether an exception pattern could re-include something below the directory `rel_dir`, in which
    /// case an excluded directory must still be read (as Docker does).
    pub(super) fn may_reinclude_under(&self, rel_dir: &str) -> bool {
        let prefix = format!("{}/", clean(rel_dir));
        self.patterns.iter().any(|p| p.exclusion && p.matcher.could_match_with_prefix(&prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text).unwrap()
    }

    #[test]
    fn dockerignore_basic_patterns() {
        let di = ignore("*.log\n**/*.tmp\nbuild/\n!build/keep.txt\n/abs\n");
        assert!(di.is_excluded("x.log"));
        assert!(!di.is_excluded("sub/x.log"), "'*' does not match '/'");
        assert!(di.is_excluded("a.tmp"));
        assert!(di.is_excluded("a/b/c.tmp"));
        assert!(di.is_excluded("build"));
        assert!(di.is_excluded("build/out/bin"), "a dir's exclusion covers its children");
        assert!(!di.is_excluded("build/keep.txt"));
        assert!(di.is_excluded("abs"));
        assert!(di.is_excluded("abs/inner"));
        assert!(!di.is_excluded("sub/abs"), "a leading '/' anchors at the root, like no '/' at all");
        assert!(!di.is_excluded("src/main.rs"));
    }

    #[test]
    fn dockerignore_comments_blank_lines_and_whitespace() {
        let di = ignore("\u{feff}# a comment\n\n   \n  secret.txt  \r\n#*.rs\n ! secret.txt/. \n");
        assert!(!di.is_excluded("main.rs"), "commented pattern is not active");
        assert!(!di.is_excluded("secret.txt"), "re-included by the cleaned exception");
        let di = ignore("# c\n  secret.txt  \r\n");
        assert!(di.is_excluded("secret.txt"));
        assert!(!di.is_excluded("# c"));
        // Docker treats '#' as a comment only at the very start of the line.
        assert!(ignore(" #x").is_excluded("#x"));
        assert!(ignore("./a/../b//c/").is_excluded("b/c"));
    }

    #[test]
    fn dockerignore_double_star_and_question_mark() {
        let all = ignore("**");
        assert!(all.is_excluded("anything"));
        assert!(all.is_excluded("deep/down/file"));
        let ab = ignore("a/**/b");
        assert!(ab.is_excluded("a/b"));
        assert!(ab.is_excluded("a/x/b"));
        assert!(ab.is_excluded("a/x/y/b"));
        assert!(ab.is_excluded("a/x/b/child"));
        assert!(!ab.is_excluded("a/xb"));
        assert!(!ab.is_excluded("c/a/b"));
        let tail = ignore("docs/**");
        assert!(tail.is_excluded("docs/a/b"));
        let q = ignore("a?c");
        assert!(q.is_excluded("abc"));
        assert!(!q.is_excluded("a/c"), "'?' does not match '/'");
        assert!(!q.is_excluded("abbc"));
        let class = ignore("file[0-9].txt\n[!a]b\n");
        assert!(class.is_excluded("file7.txt"));
        assert!(!class.is_excluded("filex.txt"));
        assert!(class.is_excluded("!b") && class.is_excluded("ab"), "Go regexp: '!' in a class is literal");
        assert!(ignore(r"a\*b").is_excluded(r"a\*b"), "no wildcard: moby compares literally");
        assert!(ignore(r"x*\*").is_excluded("xy*"), "with a wildcard, '\\' escapes");
    }

    #[test]
    fn dockerignore_last_match_wins() {
        let di = ignore("*.md\n!README.md\n");
        assert!(di.is_excluded("CHANGES.md"));
        assert!(!di.is_excluded("README.md"));
        let di = ignore("!README.md\n*.md\n");
        assert!(di.is_excluded("README.md"), "a later exclusion overrides an earlier exception");
        let di = ignore("logs\n!logs/keep\nlogs/keep/tmp\n");
        assert!(di.is_excluded("logs/a"));
        assert!(!di.is_excluded("logs/keep/b"));
        assert!(di.is_excluded("logs/keep/tmp/c"));
    }

    #[test]
    fn dockerignore_refuses_bad_patterns() {
        for (text, needle) in [("a\n!\n", "line 2"), ("file[0-9", "closing ']'"), ("[[:alpha:]]", "POSIX")] {
            let err = DockerIgnore::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn dockerignore_knows_when_an_excluded_dir_must_be_read() {
        let di = ignore("build\n!build/keep.txt\n");
        assert!(di.may_reinclude_under("build"));
        assert!(!di.may_reinclude_under("other"));
        assert!(ignore("build\n!**/keep.txt\n").may_reinclude_under("build"));
        assert!(ignore("build\n!b*/keep\n").may_reinclude_under("build"));
        assert!(!ignore("build\n!src/*.rs\n").may_reinclude_under("build"));
        assert!(!ignore("build\n").may_reinclude_under("build"));
    }
}
