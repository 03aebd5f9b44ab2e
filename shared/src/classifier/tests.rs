//! Hand-written prompts (not taken from the evaluation data) and the matcher's edge cases.

use super::*;

fn classifier() -> Classifier {
    Classifier::new(&ClassifierConfig::default()).expect("default config is valid")
}

fn user(text: &str) -> Prompt<'_> {
    Prompt {
        system: "",
        last_user: text,
        earlier_turns: 0,
        has_tools: false,
        json_output: false,
        max_tokens: None,
        total_chars: text.chars().count(),
    }
}

fn cat(c: &Classifier, text: &str) -> Category {
    c.classify(&user(text)).category
}

#[test]
fn one_prompt_per_category_family() {
    let c = classifier();
    let cases: &[(&str, Category)] = &[
        ("Please translate this paragraph into Italian: the shop opens at nine.", Category::Translation),
        ("How do you say 'good luck with the exam' in Japanese?", Category::Translation),
        ("Give me a tl;dr of the memo below.\n\nThe board met on Tuesday and agreed to delay the launch.", Category::Summarisation),
        ("Summarise the key points of this thread for someone who missed it.", Category::Summarisation),
        ("Classify the following support ticket as billing, outage or feature request: my invoice is wrong.", Category::Classification),
        ("Is the sentiment of this tweet positive or negative? 'Worst delivery service ever.'", Category::Classification),
        ("Extract every email address mentioned in the text below.\nContact ana@example.org or the desk.", Category::Extraction),
        ("List all the people named in this paragraph: Ruth met Tomas and Ingrid at the station.", Category::Extraction),
        ("Write a short poem about a lighthouse keeper who collects seashells.", Category::Creative),
        ("Tell me a bedtime story about a dragon who is afraid of the dark.", Category::Creative),
        ("Write a Python function that returns the n-th Fibonacci number.", Category::Code),
        ("Why does this fail?\n```rust\nfn main() { let v = vec![1]; v.push(2); }\n```", Category::Code),
        ("Solve step by step: a train leaves at 3pm going 60 km/h; when has it covered 150 km?", Category::Reasoning),
        ("Evaluate: (4 + 5) * 3 - 2 = ? and then 7 * 8 + 1 = ?", Category::Reasoning),
        ("Which planet is the largest in the solar system?\n(A) Mars\n(B) Jupiter\n(C) Venus", Category::Qa),
        ("hey, how are you doing today? I just got back from a hike", Category::Chat),
        ("Rephrase this sentence so it sounds more formal: we gotta fix it asap.", Category::Other),
        ("Come up with a question about the paragraph whose answer is 'Lisbon'.", Category::Other),
    ];
    for (text, want) in cases {
        let got = c.classify(&user(text));
        assert_eq!(got.category, *want, "{text:?} -> {got:?}");
        assert!((0.0..=1.0).contains(&got.confidence));
    }
}

#[test]
fn conversation_turns_mean_chat() {
    let c = classifier();
    let mut p = user("ha, that's wild. I had no idea penguins could do that");
    p.earlier_turns = 4;
    let r = c.classify(&p);
    assert_eq!(r.category, Category::Chat);
    assert_eq!(r.rule, "multi-turn");
}

#[test]
fn whole_words_only() {
    let c = classifier();
    // "translate" inside "untranslated" is not a request to translate.
    assert_ne!(
        cat(&c, "These untranslated pages are just lying around."),
        Category::Translation
    );
    // A stem pattern ("summar*") matches inflections but not from the middle of a word.
    assert_eq!(
        cat(&c, "Summarization please, of the notes above."),
        Category::Summarisation
    );
    assert_ne!(
        cat(&c, "The consummate host greeted everyone."),
        Category::Summarisation
    );
    // "sum" (added as a reasoning keyword) must not fire inside "summary".
    let mut cfg = ClassifierConfig::default();
    cfg.extra_keywords.reasoning.push("sum".into());
    let c2 = Classifier::new(&cfg).unwrap();
    let r = c2.classify(&user("Give me the summary."));
    assert_eq!(r.category, Category::Summarisation);
    assert_eq!(r.alternative, None);
    assert_eq!(
        c2.classify(&user("What is the sum?")).category,
        Category::Reasoning
    );
}

#[test]
fn case_insensitive() {
    let c = classifier();
    assert_eq!(
        cat(&c, "TRANSLATE THIS TO GERMAN: good morning"),
        Category::Translation
    );
    assert_eq!(
        cat(&c, "TrAnSlAtE this to german: good morning"),
        Category::Translation
    );
}

#[test]
fn long_context_flag_and_estimate() {
    let c = classifier();
    let short = c.classify(&user("hello"));
    assert!(!short.long_context);
    assert_eq!(short.estimated_tokens, 2);
    let doc = "Speaker A: we should ship on Friday.\n".repeat(1000);
    let text = format!("{doc}\nWhat did speaker A want?");
    let r = c.classify(&user(&text));
    assert!(r.long_context);
    assert!(r.estimated_tokens >= 8000);
    assert_eq!(r.category, Category::Summarisation);
    let cfg = ClassifierConfig {
        long_context_tokens: 100_000,
        ..Default::default()
    };
    assert!(
        !Classifier::new(&cfg)
            .unwrap()
            .classify(&user(&text))
            .long_context
    );
}

#[test]
fn conflicting_signals_set_alternative() {
    let c = classifier();
    let r = c.classify(&user(
        "Translate this summary into French and summarise it too.",
    ));
    assert!(r.alternative.is_some(), "{r:?}");
    let pair = [Some(r.category), r.alternative];
    assert!(
        pair.contains(&Some(Category::Translation))
            && pair.contains(&Some(Category::Summarisation))
    );
    // Nothing recognisable: the default rule with low confidence.
    let r = c.classify(&user("zxq vlorp"));
    assert_eq!((r.category, r.rule), (Category::Chat, "default-chat"));
    assert!(r.confidence < 0.5);
    // Tools keep a capable tier in play.
    let mut p = user("Summarize the meeting notes.");
    p.has_tools = true;
    assert_eq!(c.classify(&p).alternative, Some(Category::Reasoning));
}

#[test]
fn structured_request_signals() {
    let c = classifier();
    let mut p = user("Give me the invoice number and total from this email.");
    p.json_output = true;
    assert_eq!(c.classify(&p).category, Category::Extraction);
    let mut p = user("Airline review: the flight was fine. Label?");
    p.max_tokens = Some(2);
    assert_eq!(c.classify(&p).category, Category::Classification);
}

#[test]
fn config_validation_names_the_field() {
    let mut cfg = ClassifierConfig::default();
    cfg.keywords.translation.push("  ".into());
    let err = Classifier::new(&cfg).err().unwrap();
    assert!(err.contains("classifier.keywords.translation["), "{err}");

    let cfg = ClassifierConfig {
        min_confidence: 1.5,
        ..Default::default()
    };
    assert!(Classifier::new(&cfg)
        .err()
        .unwrap()
        .contains("min_confidence"));

    let mut cfg = ClassifierConfig::default();
    cfg.languages.push("klingon*".into());
    assert!(Classifier::new(&cfg)
        .err()
        .unwrap()
        .contains("classifier.languages["));

    let err = toml::from_str::<ClassifierConfig>("min_confidense = 0.4")
        .unwrap_err()
        .to_string();
    assert!(err.contains("min_confidense"), "{err}");
    let err = toml::from_str::<ClassifierConfig>("[keywords]\ntranslaton = [\"x\"]")
        .unwrap_err()
        .to_string();
    assert!(err.contains("translaton"), "{err}");
}

#[test]
fn config_keyword_changes_the_result() {
    let text = "Übersetze bitte: the weather is nice";
    let mut cfg: ClassifierConfig =
        toml::from_str("[extra_keywords]\ntranslation = [\"bitte\"]").unwrap();
    assert_ne!(cat(&classifier(), text), Category::Translation);
    assert_eq!(
        cat(&Classifier::new(&cfg).unwrap(), text),
        Category::Translation
    );
    // Replacing one category's list drops its defaults and keeps every other category's.
    cfg = toml::from_str("[keywords]\ntranslation = []\n[hints]\ncode = [\"snippet\"]").unwrap();
    let defaults = ClassifierConfig::default();
    assert!(cfg.keywords.translation.is_empty());
    assert_eq!(cfg.keywords.code, defaults.keywords.code);
    assert!(!cfg.keywords.code.is_empty());
    assert_eq!(cfg.hints.code, vec!["snippet".to_string()]);
    assert_eq!(cfg.hints.qa, defaults.hints.qa);
    assert!(
        toml::from_str::<ClassifierConfig>("[keywords]\ncodez = []").is_err(),
        "typos are errors"
    );
    assert_eq!(
        ClassifierConfig::default().languages,
        toml::from_str::<ClassifierConfig>("").unwrap().languages
    );
}

#[test]
fn never_panics_on_odd_input() {
    let c = classifier();
    let huge = "é漢🙂".repeat(100_000);
    let inputs = [
        "",
        "?",
        "*",
        "```",
        "🙂translate🙂 into english",
        "über-summarize",
        "translat",
        huge.as_str(),
    ];
    for text in inputs {
        let mut p = user(text);
        p.system = text;
        p.total_chars = usize::MAX;
        let r = c.classify(&p);
        assert!((0.0..=1.0).contains(&r.confidence));
        assert_eq!(r.estimated_tokens, u32::MAX);
    }
    // A non-ASCII neighbour is a word boundary.
    assert_eq!(cat(&c, "🙂translate🙂 into english"), Category::Translation);
}

#[test]
fn classifier_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Classifier>();
}

/// Long filler prose without any pattern the default lists know.
fn filler(bytes: usize) -> String {
    "Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor. "
        .repeat(bytes / 78 + 1)
}

#[test]
fn each_window_match_counts_once_wherever_it_falls() {
    // The head and tail windows are searched in several pieces side by side; a keyword
    // must count exactly once wherever it lies in a window, pieces' seams included.
    let c = classifier();
    let w = ClassifierConfig::default().instruction_window;
    for n in [40, 300, 700, 5_000] {
        let base = filler(n);
        let base = &base[..n];
        let mut confidences = Vec::new();
        for at in 0..base.len() {
            // " haiku " is inserted at `at`: the keyword spans at+1..at+6.
            let in_window = at + 1 < w || at + 6 + w > base.len() + 7;
            if !in_window || !base.is_char_boundary(at) {
                continue;
            }
            let text = format!("{} haiku {}", &base[..at], &base[at..]);
            let r = c.classify(&user(&text));
            assert_eq!(r.category, Category::Creative, "n={n} at={at}");
            confidences.push(r.confidence);
        }
        assert!(
            confidences.windows(2).all(|p| p[0] == p[1]),
            "n={n}: {confidences:?}"
        );
    }
}

#[test]
fn middle_of_a_long_text_counts_notation_only() {
    let c = classifier();
    let pad = filler(4_000);
    // A keyword deep inside a document is part of the document, not the request.
    let text = format!("{pad} translate {pad}");
    assert_ne!(cat(&c, &text), Category::Translation);
    // With `body_words` it counts at `body_weight`, capped by `body_cap`.
    let cfg = ClassifierConfig {
        body_words: true,
        body_weight: 1.0,
        body_cap: 3.0,
        ..Default::default()
    };
    assert_eq!(
        cat(&Classifier::new(&cfg).unwrap(), &text),
        Category::Translation
    );
    // Notation counts anywhere: a code fence, or an option list, in the middle.
    let text = format!("{pad}\n```\nlet x = 1;\n```\n{pad}");
    assert_eq!(cat(&c, &text), Category::Code);
    let r = c.classify(&user(&format!(
        "Which one fits?\n{pad}\n(A) red\n(B) blue\n(C) green\n{pad}"
    )));
    assert_eq!((r.category, r.rule), (Category::Qa, "multiple-choice"));
}

#[test]
fn notation_scanner_respects_word_edges_and_text_ends() {
    // A pattern found by an uncommon byte in its middle, and one at the very end of a text.
    let cfg = ClassifierConfig {
        math_notation: vec!["x^2".into(), "=>".into()],
        ..Default::default()
    };
    let c = Classifier::new(&cfg).unwrap();
    assert_eq!(cat(&c, "x^2 x^2"), Category::Reasoning);
    // "ax^2" starts inside a word: no match.
    assert_ne!(cat(&c, "ax^2 ax^2"), Category::Reasoning);
    for text in ["^", "x^", "^2", "=", "=>", "é^", "^é", "x^2"] {
        let r = c.classify(&user(text));
        assert!((0.0..=1.0).contains(&r.confidence));
    }
}

mod allocations {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNT: Cell<usize> = const { Cell::new(0) };
    }

    /// Counts allocations of the current thread only, so tests running in parallel do not
    /// disturb the count.
    struct Counting;

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            System.dealloc(ptr, layout)
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    pub fn count() -> usize {
        COUNT.with(|c| c.get())
    }
}

#[test]
fn classify_does_not_allocate() {
    let c = classifier();
    let long = format!(
        "Translate this.\n{}\n```\nfn main() {{}}\n```\n(A) x\n(B) y\nWhich of the following?",
        filler(100_000)
    );
    let texts = ["", "hello", "Summarise the key points.", long.as_str()];
    for text in texts {
        let p = user(text);
        let before = allocations::count();
        let r = c.classify(&p);
        assert_eq!(allocations::count(), before, "{r:?}");
    }
}

#[test]
fn worked_out_judgements_are_reasoning() {
    let c = classifier();
    for text in [
        "Three runners finished a race: Ana was not last, Bo finished after Cy. Figure out in what order they finished.",
        "Determine whether the following argument holds: all cats purr; Tom purrs; so Tom is a cat.",
    ] {
        assert_eq!(cat(&c, text), Category::Reasoning, "{text}");
    }
}

#[test]
fn a_prompt_without_any_signal_is_chat_even_with_min_score_zero() {
    let c = Classifier::new(&ClassifierConfig {
        min_score: 0.0,
        ..ClassifierConfig::default()
    })
    .unwrap();
    let r = c.classify(&user("xyzzy plugh"));
    assert_eq!((r.category, r.rule), (Category::Chat, "default-chat"));
}
