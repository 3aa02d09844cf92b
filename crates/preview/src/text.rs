//! Texts as previews show them: whitespace collapsed, cut on word boundaries.

/// `text` with runs of whitespace made one space and the ends trimmed, then cut to `max_words`
/// words and to `max_chars` characters (0: no limit) on a word boundary; a cut text ends with
/// `…`, within the limit. A first word longer than the limit is cut inside.
pub fn cut(text: &str, max_words: u32, max_chars: u32) -> String {
    let mut words = text.split_whitespace();
    let max_words = if max_words == 0 {
        usize::MAX
    } else {
        max_words as usize
    };
    let max_chars = if max_chars == 0 {
        usize::MAX
    } else {
        max_chars as usize
    };
    let mut out = String::new();
    let mut chars = 0usize;
    let mut cut = false;
    for (i, word) in words.by_ref().enumerate() {
        if i == max_words {
            cut = true;
            break;
        }
        let len = word.chars().count();
        let sep = usize::from(i > 0);
        if chars + sep + len > max_chars {
            cut = true;
            if i == 0 {
                out.extend(word.chars().take(max_chars));
                chars = max_chars;
            }
            break;
        }
        if sep == 1 {
            out.push(' ');
        }
        out.push_str(word);
        chars += sep + len;
    }
    if cut && max_chars > 0 {
        // Room for the ellipsis: drop whole words (or characters of a lone word) until it fits.
        while chars + 1 > max_chars {
            match out.rfind(' ') {
                Some(space) if out[..space].chars().count() > 0 => {
                    out.truncate(space);
                }
                _ => {
                    out.pop();
                }
            }
            chars = out.chars().count();
        }
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn whitespace_is_collapsed() {
        assert_eq!(cut("  a \n\t b  c ", 0, 0), "a b c");
        assert_eq!(cut("", 5, 5), "");
        assert_eq!(cut(" \n ", 5, 5), "");
    }

    #[test]
    fn words_are_counted() {
        assert_eq!(cut("one two three four", 2, 0), "one two…");
        assert_eq!(cut("one two", 2, 0), "one two");
        assert_eq!(cut("one two", 3, 100), "one two");
    }

    #[test]
    fn length_cuts_on_a_word_boundary_with_the_ellipsis_inside() {
        // 14 characters, limit 10: "hello big" (9) + "…" = 10.
        assert_eq!(cut("hello big world", 0, 10), "hello big…");
        let out = cut("hello big world", 0, 9);
        assert_eq!(out, "hello…");
        assert!(out.chars().count() <= 9);
        assert_eq!(cut("hello big", 0, 9), "hello big");
        for limit in 1..20 {
            let out = cut("aa bbb cccc ddddd eeeeee", 0, limit);
            assert!(out.chars().count() <= limit as usize, "{limit}: {out}");
            assert!(
                out.ends_with('…') || out == "aa bbb cccc ddddd eeeeee",
                "{limit}: {out}"
            );
        }
    }

    #[test]
    fn a_long_word_is_cut_inside() {
        assert_eq!(cut("abcdefghij", 0, 5), "abcd…");
        assert_eq!(cut("abcdefghij more", 0, 5), "abcd…");
        assert_eq!(cut("x", 0, 1), "x");
        assert_eq!(cut("xy", 0, 1), "…");
    }

    #[test]
    fn characters_not_bytes() {
        // Each of these is one character of several bytes; cutting never splits one.
        assert_eq!(cut("ééé ééé ééé", 0, 8), "ééé ééé…");
        assert_eq!(cut("日本語のテキスト です", 0, 6), "日本語のテ…");
    }
}
