//! Substring search with the searcher built once per needle: `memchr::memmem::find` builds a
//! new searcher on every call (~600 instructions in callgrind profiles of the request path),
//! more than the search itself costs on a short body.

#[doc(hidden)]
pub use memchr::memmem as __memmem;

/// The `memmem::Finder` (or, with `rev`, `FinderRev`) for a constant needle, built on first
/// use and kept: `finder!(b"\"usage\"").find(body)`.
#[macro_export]
macro_rules! finder {
    (@ $kind:ident, $needle:expr) => {{
        static FINDER: ::std::sync::LazyLock<$crate::needle::__memmem::$kind<'static>> =
            ::std::sync::LazyLock::new(|| $crate::needle::__memmem::$kind::new($needle));
        &*FINDER
    }};
    (rev $needle:expr) => {
        $crate::finder!(@ FinderRev, $needle)
    };
    ($needle:expr) => {
        $crate::finder!(@ Finder, $needle)
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_first_and_the_last() {
        let hay = b"a usage b usage c";
        assert_eq!(crate::finder!(b"usage").find(hay), Some(2));
        assert_eq!(crate::finder!(rev b"usage").rfind(hay), Some(10));
        assert_eq!(crate::finder!(b"nope").find(hay), None);
    }
}
