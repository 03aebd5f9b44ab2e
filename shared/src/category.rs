//! Task categories the classifier assigns and the config maps to tiers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a request asks the model to do. The set is fixed: config maps each one to a tier,
/// and usage events and response headers carry its `as_str` name.
#[derive(
    Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Extraction,
    Classification,
    Summarisation,
    Translation,
    Qa,
    Chat,
    Creative,
    Reasoning,
    Code,
    #[default]
    Other,
}

impl Category {
    pub const COUNT: usize = 10;
    pub const ALL: [Category; Category::COUNT] = [
        Category::Extraction,
        Category::Classification,
        Category::Summarisation,
        Category::Translation,
        Category::Qa,
        Category::Chat,
        Category::Creative,
        Category::Reasoning,
        Category::Code,
        Category::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Extraction => "extraction",
            Category::Classification => "classification",
            Category::Summarisation => "summarisation",
            Category::Translation => "translation",
            Category::Qa => "qa",
            Category::Chat => "chat",
            Category::Creative => "creative",
            Category::Reasoning => "reasoning",
            Category::Code => "code",
            Category::Other => "other",
        }
    }

    /// How a budget's category scope is written in the store and the control API: the
    /// category's name, or "" for the whole service.
    pub fn scope_name(scope: Option<Category>) -> &'static str {
        scope.map_or("", Category::as_str)
    }

    /// The inverse of `scope_name`; `None` when the name is no category.
    pub fn parse_scope(name: &str) -> Option<Option<Category>> {
        match name {
            "" => Some(None),
            n => Category::parse(n).map(Some),
        }
    }

    /// Parses a category name; accepts the American `summarization` spelling too,
    /// since callers set `x-switchyard-category` by hand.
    pub fn parse(name: &str) -> Option<Category> {
        let name = name.trim();
        Category::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(name))
            .or_else(|| {
                name.eq_ignore_ascii_case("summarization")
                    .then_some(Category::Summarisation)
            })
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_every_name() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()), Some(c));
            assert_eq!(Category::parse(&c.as_str().to_uppercase()), Some(c));
            assert_eq!(Category::ALL[c.index()], c);
        }
        assert_eq!(
            Category::parse("summarization"),
            Some(Category::Summarisation)
        );
        assert_eq!(Category::parse("poetry"), None);
    }
}
