//! Rule-based request classifier: maps what a request asks for (a [`Prompt`] the caller has
//! already extracted) to a [`Category`], a confidence and the rule that decided, in one linear
//! pass over each text. Owns the keyword configuration (`[classifier]`) and its validation.
//! Must not: call a model, do I/O, allocate per byte of prompt, or panic on any input.

mod defaults;

use crate::category::Category;
use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::{dfa::DFA, Anchored, MatchKind};

/// ASCII lower case by table: one load, cheaper than the arithmetic in the DFA's inner loop.
static LOWER: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (i as u8).to_ascii_lowercase();
        i += 1;
    }
    t
};

/// Independent automaton searches run side by side (see [`Classifier::scan_words`]).
const LANES: usize = 4;
use serde::{Deserialize, Serialize};

/// What the classifier looks at, already extracted from the request by the caller.
pub struct Prompt<'a> {
    /// System/developer message text, joined (may be empty).
    pub system: &'a str,
    /// Text of the last user turn (for /v1/completions: the prompt).
    pub last_user: &'a str,
    /// Number of non-system messages before the last user turn.
    pub earlier_turns: usize,
    /// `tools` or `functions` present and non-empty.
    pub has_tools: bool,
    /// `response_format` json_object / json_schema requested.
    pub json_output: bool,
    /// `max_tokens` / `max_completion_tokens` if given.
    pub max_tokens: Option<u64>,
    /// Characters of all message text (for the token estimate).
    pub total_chars: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub category: Category,
    /// 0.0..=1.0
    pub confidence: f32,
    /// Short stable id of the rule that decided, e.g. "code-fence", "kw:translation".
    pub rule: &'static str,
    /// Some(other) when signals conflict or confidence is low; the router then uses the
    /// higher tier of the two.
    pub alternative: Option<Category>,
    /// `estimated_tokens >= config.long_context_tokens`.
    pub long_context: bool,
    /// ~chars/4 estimate of the prompt.
    pub estimated_tokens: u32,
}

/// One word list per category. Unknown keys are rejected so a typo names itself.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CategoryWords {
    pub extraction: Vec<String>,
    pub classification: Vec<String>,
    pub summarisation: Vec<String>,
    pub translation: Vec<String>,
    pub qa: Vec<String>,
    pub chat: Vec<String>,
    pub creative: Vec<String>,
    pub reasoning: Vec<String>,
    pub code: Vec<String>,
    pub other: Vec<String>,
}

impl CategoryWords {
    fn lists(&self) -> [(Category, &'static str, &[String]); 10] {
        [
            (Category::Extraction, "extraction", &self.extraction),
            (
                Category::Classification,
                "classification",
                &self.classification,
            ),
            (
                Category::Summarisation,
                "summarisation",
                &self.summarisation,
            ),
            (Category::Translation, "translation", &self.translation),
            (Category::Qa, "qa", &self.qa),
            (Category::Chat, "chat", &self.chat),
            (Category::Creative, "creative", &self.creative),
            (Category::Reasoning, "reasoning", &self.reasoning),
            (Category::Code, "code", &self.code),
            (Category::Other, "other", &self.other),
        ]
    }
}

/// How `[classifier.keywords]` and `[classifier.hints]` are read: each category given there
/// replaces that category's default list; categories left out keep their defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CategoryOverrides {
    extraction: Option<Vec<String>>,
    classification: Option<Vec<String>>,
    summarisation: Option<Vec<String>>,
    translation: Option<Vec<String>>,
    qa: Option<Vec<String>>,
    chat: Option<Vec<String>>,
    creative: Option<Vec<String>>,
    reasoning: Option<Vec<String>>,
    code: Option<Vec<String>>,
    other: Option<Vec<String>>,
}

impl CategoryOverrides {
    fn over(self, mut base: CategoryWords) -> CategoryWords {
        let pairs = [
            (self.extraction, &mut base.extraction),
            (self.classification, &mut base.classification),
            (self.summarisation, &mut base.summarisation),
            (self.translation, &mut base.translation),
            (self.qa, &mut base.qa),
            (self.chat, &mut base.chat),
            (self.creative, &mut base.creative),
            (self.reasoning, &mut base.reasoning),
            (self.code, &mut base.code),
            (self.other, &mut base.other),
        ];
        for (given, list) in pairs {
            if let Some(words) = given {
                *list = words;
            }
        }
        base
    }
}

fn keywords_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<CategoryWords, D::Error> {
    Ok(CategoryOverrides::deserialize(d)?.over(defaults::keywords()))
}

fn hints_over_defaults<'de, D: serde::Deserializer<'de>>(d: D) -> Result<CategoryWords, D::Error> {
    Ok(CategoryOverrides::deserialize(d)?.over(defaults::hints()))
}

/// The `[classifier]` table. Every field has a default; setting a list replaces the default
/// list, the `extra_*` tables add to it. Patterns are whole words or phrases, matched ASCII
/// case-insensitively; a trailing `*` matches any word starting with the stem ("summar*").
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierConfig {
    /// Estimated prompt tokens (~chars/4) at or above which `long_context` is set. Default 8000.
    pub long_context_tokens: u32,
    /// Confidence below which the runner-up category is reported as `alternative`. Default 0.5.
    pub min_confidence: f32,
    /// Runner-up score, as a share of the winner's, at or above which the signals count as
    /// conflicting and `alternative` is set whatever the confidence. Default 0.75.
    pub conflict_ratio: f32,
    /// Bytes at the start and at the end of each text where a hit counts fully: instructions
    /// sit there, while the middle is usually the document being worked on. Default 256.
    pub instruction_window: usize,
    /// Weight of a hit in the middle of a text, relative to one in the window. Default 0.2.
    pub body_weight: f32,
    /// Most that middle-of-text hits may add to one category. Default 1.0.
    pub body_cap: f32,
    /// Score a `keywords` hit adds to its category. Default 3.0.
    pub keyword_weight: f32,
    /// Score a `hints` hit adds to its category. Default 1.0.
    pub hint_weight: f32,
    /// Most that hints in the instruction window may add to one category. Default 2.0.
    pub hint_cap: f32,
    /// Strong task signals per category (e.g. "translat*", "summar*", "sentiment").
    #[serde(deserialize_with = "keywords_over_defaults")]
    pub keywords: CategoryWords,
    /// Weak hints per category (e.g. "review", "passage", "do you").
    #[serde(deserialize_with = "hints_over_defaults")]
    pub hints: CategoryWords,
    /// Added to `keywords` without replacing the defaults.
    pub extra_keywords: CategoryWords,
    /// Added to `hints` without replacing the defaults.
    pub extra_hints: CategoryWords,
    /// Natural-language names: "into/to <name>" (also "mean in", "say it in", ...) counts as
    /// a translation keyword, "in/from <name>" at 1.5 times a hint, a bare name not at all.
    pub languages: Vec<String>,
    /// Source-code tokens ("def ", "=>", "();"); each occurrence adds `code_syntax_weight`
    /// to code, up to `notation_cap`, once at least two occur.
    pub code_syntax: Vec<String>,
    /// Score per code-syntax occurrence. Default 0.5.
    pub code_syntax_weight: f32,
    /// Maths / boolean notation (" + ", "√", "not true"); each occurrence adds
    /// `math_weight` to reasoning, up to `notation_cap`, once at least two occur.
    pub math_notation: Vec<String>,
    /// Score per maths-notation occurrence. Default 0.5.
    pub math_weight: f32,
    /// Most that code syntax or maths notation may add. Default 3.0.
    pub notation_cap: f32,
    /// Multiple-choice markers ("(a)", "\nb.", "options:"); two or more add
    /// `multiple_choice_weight` to qa.
    pub option_markers: Vec<String>,
    /// Default 1.5.
    pub multiple_choice_weight: f32,
    /// Score a code fence (```) adds to code. Default 5.0.
    pub code_fence_weight: f32,
    /// Earlier turns at or above which the request is a conversation. Default 2.
    pub conversation_turns: usize,
    /// Score a conversation adds to chat. Default 3.0.
    pub conversation_weight: f32,
    /// Score a long-context prompt adds to summarisation (a question over a long document
    /// is answered by condensing it). Default 4.0.
    pub long_context_weight: f32,
    /// Last-user text of at least this many bytes counts as a passage: a question about it
    /// (any qa hint or keyword) is answered from the text, i.e. extraction. Default 600.
    pub passage_bytes: usize,
    /// Score a question over a passage adds to extraction. Default 2.0.
    pub passage_question_weight: f32,
    /// Score `response_format` json adds to extraction. Default 1.0.
    pub json_output_weight: f32,
    /// `max_tokens` at or below which the answer is a label: adds `hint_weight` to
    /// classification. Default 8.
    pub label_max_tokens: u64,
    /// A winner below this score is not trusted: the default rule (chat) applies. Default 0.9.
    pub min_score: f32,
    /// Also count keywords, hints and language names in the middle of a text (between the
    /// instruction windows), at `body_weight` and up to `body_cap` per category. Off by
    /// default: only notation (code syntax, maths, option markers, code fences) counts there,
    /// which is found without the full automaton and so is faster on long prompts.
    pub body_words: bool,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            long_context_tokens: 8000,
            min_confidence: 0.5,
            conflict_ratio: 0.75,
            instruction_window: 256,
            body_weight: 0.2,
            body_cap: 1.0,
            keyword_weight: 3.0,
            hint_weight: 1.0,
            hint_cap: 2.0,
            keywords: defaults::keywords(),
            hints: defaults::hints(),
            extra_keywords: CategoryWords::default(),
            extra_hints: CategoryWords::default(),
            languages: defaults::languages(),
            code_syntax: defaults::code_syntax(),
            code_syntax_weight: 0.5,
            math_notation: defaults::math_notation(),
            math_weight: 0.5,
            notation_cap: 3.0,
            option_markers: defaults::option_markers(),
            multiple_choice_weight: 1.5,
            code_fence_weight: 5.0,
            conversation_turns: 2,
            conversation_weight: 3.0,
            long_context_weight: 4.0,
            passage_bytes: 600,
            passage_question_weight: 2.0,
            json_output_weight: 1.0,
            label_max_tokens: 8,
            min_score: 0.9,
            body_words: false,
        }
    }
}

/// Where a score came from; names the rule in [`Classification::rule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Keyword,
    Hint,
    Language,
    CodeFence,
    CodeSyntax,
    Math,
    MultipleChoice,
    Conversation,
    LongContext,
    PassageQuestion,
    JsonOutput,
    MaxTokens,
}

/// What one matched pattern does. A pattern listed in several places has several effects.
#[derive(Debug, Clone, Copy)]
enum Effect {
    Score {
        category: Category,
        signal: Signal,
        weight: f32,
    },
    /// A language name: scored by the words before it (see [`language_request`]).
    Language,
    CodeSyntax,
    Math,
    Option,
    Fence,
}

/// The effects of one automaton pattern are `effects[start..end]`; each effect carries
/// whether it came from a `stem*` entry (the match may end inside a word).
#[derive(Debug, Clone, Copy)]
struct PatternInfo {
    start: u32,
    end: u32,
}

/// Built once per config; immutable afterwards, so it is Send + Sync and shared in an Arc.
pub struct Classifier {
    /// Words and phrases (and any notation made only of letters and spaces).
    automaton: DFA,
    /// Longest pattern of `automaton`, in bytes.
    max_pattern_len: usize,
    /// Effects of each `automaton` pattern.
    patterns: Vec<PatternInfo>,
    /// Notation that contains an uncommon byte, found by that byte.
    notation: NotationScanner,
    /// (effect, from a `stem*` entry: the match may end inside a word).
    effects: Vec<(Effect, bool)>,
    config: ClassifierConfig,
}

/// Per-call tallies; lives on the stack.
#[derive(Default)]
struct Tally {
    window: [f32; 10],
    /// Hints in the window, kept apart so a pile of weak words cannot outvote one keyword.
    hints: [f32; 10],
    body: [f32; 10],
    /// Best single contribution per category and the signal that made it (for `rule`).
    best: [(f32, Option<Signal>); 10],
    code_syntax: f32,
    math: f32,
    options: u32,
    fences: u32,
}

impl Tally {
    fn add(
        &mut self,
        category: Category,
        signal: Signal,
        weight: f32,
        in_window: bool,
        body_weight: f32,
    ) {
        let i = category.index();
        let w = if in_window {
            weight
        } else {
            weight * body_weight
        };
        if in_window && signal == Signal::Hint {
            self.hints[i] += w;
        } else if in_window {
            self.window[i] += w;
        } else {
            self.body[i] += w;
        }
        if w > self.best[i].0 {
            self.best[i] = (w, Some(signal));
        }
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

impl Classifier {
    /// Validates the config and builds the matcher. The error names the offending key.
    pub fn new(config: &ClassifierConfig) -> Result<Classifier, String> {
        validate_numbers(config)?;
        let mut builder = Builder::default();
        for (table, words, weight, signal) in [
            (
                "keywords",
                &config.keywords,
                config.keyword_weight,
                Signal::Keyword,
            ),
            (
                "extra_keywords",
                &config.extra_keywords,
                config.keyword_weight,
                Signal::Keyword,
            ),
            ("hints", &config.hints, config.hint_weight, Signal::Hint),
            (
                "extra_hints",
                &config.extra_hints,
                config.hint_weight,
                Signal::Hint,
            ),
        ] {
            for (category, key, list) in words.lists() {
                for (i, p) in list.iter().enumerate() {
                    let field = format!("classifier.{table}.{key}[{i}]");
                    builder.add(
                        p,
                        &field,
                        Effect::Score {
                            category,
                            signal,
                            weight,
                        },
                    )?;
                }
            }
        }
        for (i, lang) in config.languages.iter().enumerate() {
            let field = format!("classifier.languages[{i}]");
            let (lang, stem) = normalise(lang, &field)?;
            if stem {
                return Err(format!("{field}: a language name cannot end in `*`"));
            }
            // One pattern per name; the word before it is read at match time, which keeps
            // the automaton (and its cache footprint) small.
            builder.add(&lang, &field, Effect::Language)?;
        }
        for (name, list, effect) in [
            ("code_syntax", &config.code_syntax, Effect::CodeSyntax),
            ("math_notation", &config.math_notation, Effect::Math),
            ("option_markers", &config.option_markers, Effect::Option),
        ] {
            for (i, p) in list.iter().enumerate() {
                builder.add(p, &format!("classifier.{name}[{i}]"), effect)?;
            }
        }
        builder.add("```", "code fence", Effect::Fence)?;
        builder.build(config.clone())
    }

    /// Classifies one prompt. Cost is linear in the text: one automaton pass per text plus
    /// constant work per match.
    pub fn classify(&self, prompt: &Prompt<'_>) -> Classification {
        let c = &self.config;
        let mut t = Tally::default();
        self.scan(prompt.system, &mut t);
        self.scan(prompt.last_user, &mut t);

        let mut scores = [0.0f32; 10];
        for (i, s) in scores.iter_mut().enumerate() {
            *s = t.window[i] + t.hints[i].min(c.hint_cap) + t.body[i].min(c.body_cap);
        }
        // A bare question over a passage: qa asked, and no other task keyword present.
        let asks_question = scores[Category::Qa.index()] > 0.0
            && has_question_mark(prompt.last_user, c.instruction_window)
            && Category::ALL.iter().all(|&k| {
                matches!(k, Category::Qa | Category::Extraction)
                    || scores[k.index()] < c.keyword_weight
            });
        let mut bump = |category: Category, signal: Signal, w: f32| {
            let i = category.index();
            scores[i] += w;
            if w > t.best[i].0 {
                t.best[i] = (w, Some(signal));
            }
        };
        if t.fences > 0 {
            bump(Category::Code, Signal::CodeFence, c.code_fence_weight);
        }
        if t.code_syntax >= 2.0 {
            bump(
                Category::Code,
                Signal::CodeSyntax,
                (t.code_syntax * c.code_syntax_weight).min(c.notation_cap),
            );
        }
        if t.math >= 2.0 {
            bump(
                Category::Reasoning,
                Signal::Math,
                (t.math * c.math_weight).min(c.notation_cap),
            );
        }
        if t.options >= 2 {
            bump(
                Category::Qa,
                Signal::MultipleChoice,
                c.multiple_choice_weight,
            );
        }
        if prompt.earlier_turns >= c.conversation_turns {
            bump(Category::Chat, Signal::Conversation, c.conversation_weight);
        }
        let estimated_tokens = estimate_tokens(prompt);
        let long_context = estimated_tokens >= c.long_context_tokens;
        if long_context {
            bump(
                Category::Summarisation,
                Signal::LongContext,
                c.long_context_weight,
            );
        } else if prompt.last_user.len() >= c.passage_bytes && asks_question && t.options < 2 {
            bump(
                Category::Extraction,
                Signal::PassageQuestion,
                c.passage_question_weight,
            );
        }
        if prompt.json_output {
            bump(
                Category::Extraction,
                Signal::JsonOutput,
                c.json_output_weight,
            );
        }
        if prompt.max_tokens.is_some_and(|m| m <= c.label_max_tokens) {
            bump(Category::Classification, Signal::MaxTokens, c.hint_weight);
        }

        // Ties go to the earlier category in this order: the more demanding tasks first,
        // so an even split routes conservatively.
        const ORDER: [Category; 10] = [
            Category::Code,
            Category::Reasoning,
            Category::Translation,
            Category::Summarisation,
            Category::Creative,
            Category::Extraction,
            Category::Classification,
            Category::Qa,
            Category::Other,
            Category::Chat,
        ];
        let (mut first, mut second) = (ORDER[0], ORDER[1]);
        if scores[second.index()] > scores[first.index()] {
            std::mem::swap(&mut first, &mut second);
        }
        for &cat in &ORDER[2..] {
            let s = scores[cat.index()];
            if s > scores[first.index()] {
                second = first;
                first = cat;
            } else if s > scores[second.index()] {
                second = cat;
            }
        }
        let (s1, s2) = (scores[first.index()], scores[second.index()]);

        // Tools mean an agentic turn: whatever the text says, keep a capable tier in play.
        let tools_alt = prompt.has_tools.then_some(Category::Reasoning);
        // No signal at all is never a category, whatever `min_score` allows.
        if s1 <= 0.0 || s1 < c.min_score {
            return Classification {
                category: Category::Chat,
                confidence: 0.3,
                rule: "default-chat",
                alternative: tools_alt
                    .or((s1 > 0.0).then_some(first))
                    .filter(|a| *a != Category::Chat),
                long_context,
                estimated_tokens,
            };
        }
        let confidence = (s1 / (s1 + s2 + 1.0)).clamp(0.0, 1.0);
        let conflicting =
            s2 > 0.0 && (confidence < c.min_confidence || s2 >= c.conflict_ratio * s1);
        let alternative = if conflicting {
            Some(second)
        } else {
            tools_alt.filter(|a| *a != first)
        };
        Classification {
            category: first,
            confidence,
            rule: rule_id(first, t.best[first.index()].1),
            alternative,
            long_context,
            estimated_tokens,
        }
    }

    /// Scores one text: notation everywhere (a table lookup per byte), words and phrases
    /// with the automaton in the head and tail windows only. A text up to twice the window
    /// plus the longest pattern is searched in one piece; the two spans of a longer text
    /// never report the same match twice.
    fn scan(&self, text: &str, t: &mut Tally) {
        let bytes = text.as_bytes();
        let n = bytes.len();
        let w = self.config.instruction_window;
        self.notation.scan(self, bytes, t);
        let l = self.max_pattern_len;
        if self.config.body_words || n <= w.saturating_add(l).saturating_mul(2) {
            // Short text (or words count everywhere): all of it, in up to four parts.
            let k = (n / l.saturating_mul(2).max(1)).clamp(1, LANES);
            let mut ends = [(0, 0); LANES];
            for (i, r) in ends.iter_mut().enumerate().take(k) {
                *r = (n * i / k, n * (i + 1) / k);
            }
            self.scan_words(bytes, &ends[..k], t);
        } else {
            // Matches that start in the head window end at or before `w + l`; the tail
            // window's matches end after `n - w`. Each window is cut in two.
            let (h, m) = (w + l, n - w);
            let ends = [(0, h / 2), (h / 2, h), (m, m + w / 2), (m + w / 2, n)];
            self.scan_words(bytes, &ends, t);
        }
    }

    /// Overlapping search with the automaton for the matches whose end lies in one of the
    /// `ends` ranges `(lo, hi]` (disjoint, so no match counts twice). A match outside the
    /// instruction windows counts only if `body_words` is set.
    ///
    /// The ranges are searched in lock-step, one DFA per range started `max_pattern_len`
    /// bytes before it: a DFA step waits on the previous one's table load, so independent
    /// searches run side by side in the time of one.
    fn scan_words(&self, bytes: &[u8], ends: &[(usize, usize)], t: &mut Tally) {
        let dfa = &self.automaton;
        let Ok(start) = dfa.start_state(Anchored::No) else {
            return;
        };
        let mut at = [0usize; LANES];
        let mut sid = [start; LANES];
        let lanes = ends.len().min(LANES);
        for (a, &(lo, _)) in at.iter_mut().zip(ends) {
            *a = lo.saturating_sub(self.max_pattern_len);
        }
        // Steps every lane can take before its range ends.
        let common = ends[..lanes]
            .iter()
            .zip(&at)
            .map(|(&(_, hi), &a)| hi - a)
            .min()
            .unwrap_or(0);
        for _ in 0..common {
            for i in 0..LANES.min(lanes) {
                sid[i] = dfa.next_state(Anchored::No, sid[i], LOWER[usize::from(bytes[at[i]])]);
                at[i] += 1;
                if dfa.is_special(sid[i]) {
                    self.report(sid[i], at[i], ends[i].0, bytes, t);
                }
            }
        }
        for i in 0..lanes {
            while at[i] < ends[i].1 {
                sid[i] = dfa.next_state(Anchored::No, sid[i], LOWER[usize::from(bytes[at[i]])]);
                at[i] += 1;
                if dfa.is_special(sid[i]) {
                    self.report(sid[i], at[i], ends[i].0, bytes, t);
                }
            }
        }
    }

    /// The matches of DFA state `sid` reached at `end`, if `end` is past `lo`.
    #[inline(never)]
    fn report(&self, sid: StateID, end: usize, lo: usize, bytes: &[u8], t: &mut Tally) {
        let dfa = &self.automaton;
        if end <= lo || !dfa.is_match(sid) {
            return;
        }
        let n = bytes.len();
        let w = self.config.instruction_window;
        for k in 0..dfa.match_len(sid) {
            let pid = dfa.match_pattern(sid, k);
            let s = end - dfa.pattern_len(pid);
            let in_window = s < w || end.saturating_add(w) > n;
            if !(in_window || self.config.body_words) {
                continue;
            }
            let Some(whole_word) = word_edges(bytes, s, end) else {
                continue;
            };
            let info = self.patterns[pid.as_usize()];
            self.apply_all(info, whole_word, bytes, s, in_window, t);
        }
    }

    /// Adds the effects of one pattern matched at `s`.
    fn apply_all(
        &self,
        info: PatternInfo,
        whole_word: bool,
        bytes: &[u8],
        s: usize,
        in_window: bool,
        t: &mut Tally,
    ) {
        for &(effect, prefix) in &self.effects[info.start as usize..info.end as usize] {
            if whole_word || prefix {
                self.apply(effect, bytes, s, in_window, t);
            }
        }
    }

    /// Adds one effect of a match starting at `s`.
    fn apply(&self, effect: Effect, bytes: &[u8], s: usize, in_window: bool, t: &mut Tally) {
        let c = &self.config;
        let count = if in_window { 1.0 } else { c.body_weight };
        match effect {
            Effect::Score {
                category,
                signal,
                weight,
            } => t.add(category, signal, weight, in_window, c.body_weight),
            Effect::Language => {
                let weight = match language_request(bytes, s) {
                    LanguageCue::Target => c.keyword_weight,
                    LanguageCue::Mention => c.hint_weight * 1.5,
                    LanguageCue::None => return,
                };
                t.add(
                    Category::Translation,
                    Signal::Language,
                    weight,
                    in_window,
                    c.body_weight,
                )
            }
            Effect::CodeSyntax => t.code_syntax += count,
            Effect::Math => t.math += count,
            Effect::Option => t.options += 1,
            Effect::Fence => t.fences += 1,
        }
    }
}

/// Word boundaries of a match `s..e`, checked on bytes, so nothing is ever sliced inside a
/// UTF-8 character; a non-ASCII neighbour counts as a boundary. `None`: the match starts
/// inside a word. `Some(whole_word)`: whether it also ends at a word boundary (a stem may
/// end inside a word).
fn word_edges(bytes: &[u8], s: usize, e: usize) -> Option<bool> {
    if is_word_byte(bytes[s]) && s > 0 && is_word_byte(bytes[s - 1]) {
        return None;
    }
    Some(!(is_word_byte(bytes[e - 1]) && e < bytes.len() && is_word_byte(bytes[e])))
}

/// How common a byte is in ordinary text, for choosing the byte that finds a body pattern:
/// 3 = letters and space (never used), 2 = digits and common punctuation, 1 = line breaks and
/// non-ASCII, 0 = other ASCII symbols.
fn commonness(b: u8) -> u8 {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' | b' ' => 3,
        b'0'..=b'9' | b'.' | b',' | b'\'' | b'"' | b'-' => 2,
        b'\n' | b'\r' | b'\t' | 0x80..=0xff => 1,
        _ => 0,
    }
}

/// A notation pattern, found at its `offset`-th byte (its least common one).
#[derive(Debug, Clone)]
struct NotationPattern {
    /// Lower-cased pattern bytes.
    bytes: Box<[u8]>,
    offset: usize,
    effects: PatternInfo,
}

/// Finds notation (code syntax, maths, option markers, code fences) without an automaton:
/// one table lookup per byte, and a short comparison where a byte occurs that some pattern
/// is found by. Prose rarely holds such bytes, so this runs at memory speed over the middle
/// of a long prompt, where the automaton does not go. Notation made only of letters and
/// spaces ("def ", "not true") has no such byte; it is left to the automaton (windows only).
#[derive(Debug, Clone)]
struct NotationScanner {
    /// Patterns grouped by the byte that finds them.
    patterns: Vec<NotationPattern>,
    /// `patterns[range[b].0 as usize..range[b].1 as usize]` are found by byte `b`.
    range: [(u16, u16); 256],
    /// 1 where `range[b]` is not empty: the hot loop reads one byte per text byte.
    hit: [u8; 256],
}

impl NotationScanner {
    /// `list` holds at most `u16::MAX` patterns (checked by the caller).
    fn new(mut list: Vec<NotationPattern>) -> NotationScanner {
        list.sort_by_key(|p| p.bytes[p.offset]);
        let mut range = [(0u16, 0u16); 256];
        for (i, p) in list.iter().enumerate() {
            let b = p.bytes[p.offset] as usize;
            let i = i as u16;
            if range[b].0 == range[b].1 {
                range[b] = (i, i + 1);
            } else {
                range[b].1 = i + 1;
            }
        }
        let mut hit = [0u8; 256];
        for (h, r) in hit.iter_mut().zip(&range) {
            *h = u8::from(r.0 != r.1);
        }
        NotationScanner {
            patterns: list,
            range,
            hit,
        }
    }

    fn scan(&self, c: &Classifier, bytes: &[u8], t: &mut Tally) {
        for (k, chunk) in bytes.chunks(8).enumerate() {
            // Eight independent table reads and one branch: in prose most chunks hold no
            // byte that finds a pattern.
            if chunk.iter().fold(0u8, |a, &b| a | self.hit[b as usize]) == 0 {
                continue;
            }
            for (j, &b) in chunk.iter().enumerate() {
                if self.hit[b as usize] != 0 {
                    self.check(c, bytes, k * 8 + j, t);
                }
            }
        }
    }

    /// Tries the patterns that the byte at `i` finds.
    fn check(&self, c: &Classifier, bytes: &[u8], i: usize, t: &mut Tally) {
        let n = bytes.len();
        let w = c.config.instruction_window;
        let (lo, hi) = self.range[bytes[i] as usize];
        for p in &self.patterns[lo as usize..hi as usize] {
            let Some(s) = i.checked_sub(p.offset) else {
                continue;
            };
            let e = s + p.bytes.len();
            if e > n || !bytes[s..e].eq_ignore_ascii_case(&p.bytes) {
                continue;
            }
            let Some(whole_word) = word_edges(bytes, s, e) else {
                continue;
            };
            let in_window = s < w || e.saturating_add(w) > n;
            c.apply_all(p.effects, whole_word, bytes, s, in_window, t);
        }
    }
}

enum LanguageCue {
    /// "into/to <language>", "mean/say (it) in <language>": a translation request.
    Target,
    /// "in/from <language>": maybe one.
    Mention,
    None,
}

/// Reads the (at most two) words before a language name at `start`, ASCII
/// case-insensitively, without allocating.
fn language_request(text: &[u8], start: usize) -> LanguageCue {
    let Some((w1, rest)) = word_before(text, start) else {
        return LanguageCue::None;
    };
    let is = |w: &[u8], s: &str| w.eq_ignore_ascii_case(s.as_bytes());
    if is(w1, "into") || is(w1, "to") {
        return LanguageCue::Target;
    }
    if is(w1, "in") {
        if let Some((w2, _)) = word_before(text, rest) {
            if [
                "mean", "means", "say", "it", "said", "version", "written", "write",
            ]
            .iter()
            .any(|s| is(w2, s))
            {
                return LanguageCue::Target;
            }
        }
        return LanguageCue::Mention;
    }
    if is(w1, "from") {
        return LanguageCue::Mention;
    }
    LanguageCue::None
}

/// The ASCII word that ends right before `end` (after skipping spaces), and its start.
/// Looks at no more than a few bytes, so the cost per match is constant.
fn word_before(text: &[u8], end: usize) -> Option<(&[u8], usize)> {
    let mut e = end;
    while e > 0 && end - e < 4 && text[e - 1] == b' ' {
        e -= 1;
    }
    if e == end {
        return None;
    }
    let mut s = e;
    while s > 0 && e - s < 8 && text[s - 1].is_ascii_alphabetic() {
        s -= 1;
    }
    if s == e || (s > 0 && is_word_byte(text[s - 1])) {
        return None;
    }
    Some((&text[s..e], s))
}

/// A '?' in the head or tail window: the instruction asks something. Bounded work, not a
/// second pass over the text.
fn has_question_mark(text: &str, window: usize) -> bool {
    let b = text.as_bytes();
    let head = &b[..b.len().min(window)];
    let tail = &b[b.len().saturating_sub(window)..];
    memchr::memchr(b'?', head).is_some() || memchr::memchr(b'?', tail).is_some()
}

fn rule_id(category: Category, signal: Option<Signal>) -> &'static str {
    match signal {
        Some(Signal::Hint) => match category {
            Category::Extraction => "hint:extraction",
            Category::Classification => "hint:classification",
            Category::Summarisation => "hint:summarisation",
            Category::Translation => "hint:translation",
            Category::Qa => "hint:qa",
            Category::Chat => "hint:chat",
            Category::Creative => "hint:creative",
            Category::Reasoning => "hint:reasoning",
            Category::Code => "hint:code",
            Category::Other => "hint:other",
        },
        Some(Signal::Language) => "translate-to-language",
        Some(Signal::CodeFence) => "code-fence",
        Some(Signal::CodeSyntax) => "code-syntax",
        Some(Signal::Math) => "math-notation",
        Some(Signal::MultipleChoice) => "multiple-choice",
        Some(Signal::Conversation) => "multi-turn",
        Some(Signal::LongContext) => "long-context",
        Some(Signal::PassageQuestion) => "passage-question",
        Some(Signal::JsonOutput) => "json-output",
        Some(Signal::MaxTokens) => "max-tokens",
        Some(Signal::Keyword) | None => match category {
            Category::Extraction => "kw:extraction",
            Category::Classification => "kw:classification",
            Category::Summarisation => "kw:summarisation",
            Category::Translation => "kw:translation",
            Category::Qa => "kw:qa",
            Category::Chat => "kw:chat",
            Category::Creative => "kw:creative",
            Category::Reasoning => "kw:reasoning",
            Category::Code => "kw:code",
            Category::Other => "kw:other",
        },
    }
}

fn estimate_tokens(prompt: &Prompt<'_>) -> u32 {
    // Byte length is the fallback when the caller did not count characters.
    let chars = if prompt.total_chars > 0 {
        prompt.total_chars
    } else {
        prompt.system.len().saturating_add(prompt.last_user.len())
    };
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

fn validate_numbers(c: &ClassifierConfig) -> Result<(), String> {
    let unit = [
        ("min_confidence", c.min_confidence),
        ("conflict_ratio", c.conflict_ratio),
        ("body_weight", c.body_weight),
    ];
    for (name, v) in unit {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!(
                "classifier.{name} must be within 0.0..=1.0, got {v}"
            ));
        }
    }
    let non_negative = [
        ("body_cap", c.body_cap),
        ("keyword_weight", c.keyword_weight),
        ("hint_weight", c.hint_weight),
        ("hint_cap", c.hint_cap),
        ("code_syntax_weight", c.code_syntax_weight),
        ("math_weight", c.math_weight),
        ("notation_cap", c.notation_cap),
        ("multiple_choice_weight", c.multiple_choice_weight),
        ("code_fence_weight", c.code_fence_weight),
        ("conversation_weight", c.conversation_weight),
        ("long_context_weight", c.long_context_weight),
        ("passage_question_weight", c.passage_question_weight),
        ("json_output_weight", c.json_output_weight),
        ("min_score", c.min_score),
    ];
    for (name, v) in non_negative {
        if !v.is_finite() || v < 0.0 {
            return Err(format!(
                "classifier.{name} must be a finite number >= 0, got {v}"
            ));
        }
    }
    if c.long_context_tokens == 0 {
        return Err("classifier.long_context_tokens must be > 0".to_owned());
    }
    Ok(())
}

/// Lower-cases (ASCII) a pattern and splits off a stem marker: a `*` right after a letter or
/// digit at the end ("summar*"); any other `*` is literal (" * " is multiplication). Spaces
/// and newlines are kept: they are part of patterns such as "def " or "\na.".
fn normalise(pattern: &str, field: &str) -> Result<(String, bool), String> {
    if pattern.trim().is_empty() {
        return Err(format!("{field}: empty pattern"));
    }
    let p = pattern.to_ascii_lowercase();
    match p.strip_suffix('*') {
        Some(stem) if stem.bytes().last().is_some_and(is_word_byte) => Ok((stem.to_owned(), true)),
        _ => Ok((p, false)),
    }
}

/// Collects patterns, merging duplicates (the same stem may be listed by several signals).
#[derive(Default)]
struct Builder {
    stems: Vec<String>,
    index: ahash::AHashMap<String, usize>,
    effects: Vec<Vec<(Effect, bool)>>,
}

impl Builder {
    fn add(&mut self, pattern: &str, field: &str, effect: Effect) -> Result<(), String> {
        let (stem, prefix) = normalise(pattern, field)?;
        let i = match self.index.get(&stem) {
            Some(&i) => i,
            None => {
                self.stems.push(stem.clone());
                self.effects.push(Vec::new());
                self.index.insert(stem, self.stems.len() - 1);
                self.stems.len() - 1
            }
        };
        self.effects[i].push((effect, prefix));
        Ok(())
    }

    fn build(self, config: ClassifierConfig) -> Result<Classifier, String> {
        let mut words = Vec::new();
        let mut patterns = Vec::new();
        let mut notation = Vec::new();
        let mut effects = Vec::new();
        for (stem, eff) in self.stems.into_iter().zip(self.effects) {
            let start = effects.len() as u32;
            // Pure notation with an uncommon byte goes to the notation scanner; everything
            // else (any word-like effect, or no uncommon byte) to the automaton.
            let all_notation = eff.iter().all(|(e, _)| {
                matches!(
                    e,
                    Effect::CodeSyntax | Effect::Math | Effect::Option | Effect::Fence
                )
            });
            let trigger = stem
                .bytes()
                .enumerate()
                .min_by_key(|&(_, b)| commonness(b))
                .filter(|&(_, b)| commonness(b) < 3);
            effects.extend(eff);
            let info = PatternInfo {
                start,
                end: effects.len() as u32,
            };
            match trigger {
                Some((offset, _)) if all_notation => notation.push(NotationPattern {
                    bytes: stem.into_bytes().into(),
                    offset,
                    effects: info,
                }),
                _ => {
                    words.push(stem);
                    patterns.push(info);
                }
            }
        }
        if notation.len() > usize::from(u16::MAX) {
            return Err("classifier: too many notation patterns".to_owned());
        }
        // Patterns are lower case and the scan lowers each byte, instead of a case-insensitive
        // DFA: byte classes are ranges, so upper-case letters would be 26 more classes, the
        // table's stride 128 instead of 64, and the DFA twice the memory (1.3 MB, the largest
        // part of an idle router's heap) for no speed.
        let automaton = DFA::builder()
            .match_kind(MatchKind::Standard)
            .start_kind(aho_corasick::StartKind::Unanchored)
            .prefilter(false)
            .build(&words)
            .map_err(|e| format!("classifier: cannot build the keyword matcher: {e}"))?;
        Ok(Classifier {
            max_pattern_len: automaton.max_pattern_len(),
            automaton,
            patterns,
            notation: NotationScanner::new(notation),
            effects,
            config,
        })
    }
}

#[cfg(test)]
mod tests;
