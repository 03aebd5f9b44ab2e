//! Classifier cost per prompt size: `Classifier::classify` on 1, 8, 64 and 512 KiB prompts,
//! reported as bytes/second. The budget is ~2 us per KiB on one core.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use switchyard_shared::classifier::{Classifier, ClassifierConfig, Prompt};

/// Mixed prose with some keywords, code-like tokens and multibyte text, so the matcher sees
/// a realistic rate of candidate matches and boundary checks.
const PARAGRAPH: &str = "The committee met on Tuesday to review the quarterly figures. \
    Revenue grew in every region except the north, where a supplier dispute delayed \
    deliveries; the chair asked for a summary of the options by Friday. Ana noted that \
    the untranslated contract (see section 4.2) still says `return x == y;` in an appendix, \
    and that the café in Zürich — 東京 office too — reported 3 + 4 = 7 new clients. \
    Do you think we should extend the pilot? ";

fn prompt_of(bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + PARAGRAPH.len());
    while text.len() < bytes {
        text.push_str(PARAGRAPH);
    }
    text.push_str("\n\nSummarise the discussion above in three bullet points.");
    text
}

fn classify(c: &mut Criterion) {
    let classifier = Classifier::new(&ClassifierConfig::default()).expect("default config");
    let mut group = c.benchmark_group("classify");
    for kib in [1usize, 8, 64, 512] {
        let text = prompt_of(kib * 1024);
        let prompt = Prompt {
            system: "You are a helpful assistant.",
            last_user: &text,
            earlier_turns: 0,
            has_tools: false,
            json_output: false,
            max_tokens: None,
            total_chars: text.chars().count(),
        };
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{kib}KiB")),
            &prompt,
            |b, p| b.iter(|| classifier.classify(black_box(p))),
        );
    }
    group.finish();
}

criterion_group!(benches, classify);
criterion_main!(benches);
