//! BLIP's text cleaning: [`pre_caption`] for captions (pre-training, fine-tuning and the
//! CapFilt filter) and [`pre_question`] for VQA, transcribed from the original `data/utils.py`.

/// The characters BLIP's text cleaning removes: `. ! " ( ) * # : ; ~`.
fn is_punct(c: char) -> bool {
    matches!(c, '.' | '!' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~')
}

/// Python's `\s` on `str`: Rust's whitespace plus the separators U+001C–U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `' '.join(text.split(' ')[:max_words])` when there are more words: words are
/// separated by single spaces only (a tab is inside a word).
fn truncate_words(text: String, max_words: usize) -> String {
    if text.split(' ').count() > max_words {
        text.split(' ')
            .take(max_words)
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        text
    }
}

/// BLIP's `pre_caption`: lowercase; each of `. ! " ( ) * # : ; ~` becomes a space; runs of two
/// or more whitespace characters become one space; trailing newlines, then surrounding
/// spaces, are stripped; the first `max_words` space-separated words are kept.
///
/// Lowercasing follows Unicode as Python's `str.lower` (final sigma included); characters
/// newer than the Python's Unicode tables may differ.
///
/// ```
/// use blip_core::pre_caption;
///
/// let caption = pre_caption("A DOG  running!!  on the (sunny) beach.", 30);
/// assert_eq!(caption, "a dog running on the sunny beach");
/// // Only the first `max_words` words are kept.
/// assert_eq!(pre_caption("A DOG  running!!  on the beach.", 3), "a dog running");
/// ```
pub fn pre_caption(text: &str, max_words: usize) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if is_punct(c) { ' ' } else { c })
        .collect();
    // re.sub(r"\s{2,}", " ", ...): a single whitespace character (a tab) is kept as is.
    let mut collapsed = String::with_capacity(lowered.len());
    let mut chars = lowered.chars().peekable();
    while let Some(c) = chars.next() {
        if is_py_space(c) && chars.peek().is_some_and(|&n| is_py_space(n)) {
            while chars.peek().is_some_and(|&n| is_py_space(n)) {
                chars.next();
            }
            collapsed.push(' ');
        } else {
            collapsed.push(c);
        }
    }
    let stripped = collapsed
        .trim_end_matches('\n')
        .trim_matches(' ')
        .to_string();
    truncate_words(stripped, max_words)
}

/// BLIP's `pre_question`: lowercase; `. ! " ( ) * # : ; ~` are deleted; trailing spaces are
/// stripped; the first `max_words` space-separated words are kept (50 in BLIP's VQA). Inner
/// runs of spaces are kept and count as empty words, as in the original.
///
/// ```
/// use blip_core::pre_question;
///
/// assert_eq!(pre_question("Is the dog (a puppy)?  ", 50), "is the dog a puppy?");
/// // Inner double spaces are kept and count as an empty word, as in the original.
/// assert_eq!(pre_question("red  or blue", 2), "red ");
/// ```
pub fn pre_question(text: &str, max_words: usize) -> String {
    let cleaned: String = text
        .to_lowercase()
        .chars()
        .filter(|&c| !is_punct(c))
        .collect();
    truncate_words(cleaned.trim_end_matches(' ').to_string(), max_words)
}
