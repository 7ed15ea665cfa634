//! Which request paths a route forwards: none that could climb out of the
//! route's base path upstream.
//!
//! The URL parser that builds the upstream URL (WHATWG rules) removes `.`
//! and `..` segments, reads `%2e` as a dot and `\` as `/`; upstream servers
//! may decode `%2f` and `%5c` into separators. So `/gw/../secret`,
//! `/gw/%2e%2e/secret` or `/gw/..%2fsecret` would reach `/secret` upstream
//! with the route's credential. A path is refused when one of its segments,
//! percent-decoded (repeatedly, so a double-encoded `%252e` counts too), is
//! `.` or `..` (also before a `;` parameter, as some servers read `..;`), or
//! holds a `/` or `\` that was encoded, or when it holds a raw `\`.

/// Why a path is not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathRefusal {
    /// A `.` or `..` segment, plain or percent-encoded.
    #[error("the path has a `.` or `..` segment (plain or percent-encoded)")]
    DotSegment,
    /// A `/` or `\` spelled `%2f` or `%5c` (in any case), or a raw `\`.
    #[error("the path has an encoded `/` or `\\`, or a `\\`")]
    Separator,
}

/// How often a segment is percent-decoded at most: enough for any double or
/// triple encoding a chain of servers might undo.
const DECODE_ROUNDS: usize = 4;

/// Checks the path of a request (as it came, not decoded).
pub fn check(path: &str) -> Result<(), PathRefusal> {
    for segment in path.split('/') {
        if segment.contains('\\') {
            return Err(PathRefusal::Separator);
        }
        if !segment.contains(['%', '.']) {
            continue;
        }
        let mut decoded = segment.as_bytes().to_vec();
        for _ in 0..DECODE_ROUNDS {
            if decoded.contains(&b'/') || decoded.contains(&b'\\') {
                return Err(PathRefusal::Separator);
            }
            let name = decoded.split(|b| *b == b';').next().unwrap_or_default();
            if name == b"." || name == b".." {
                return Err(PathRefusal::DotSegment);
            }
            match percent_decode(&decoded) {
                Some(next) => decoded = next,
                None => break,
            }
        }
    }
    Ok(())
}

/// `bytes` with each `%XX` decoded, or `None` when there is none.
fn percent_decode(bytes: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                changed = true;
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_in_every_spelling_are_refused() {
        for path in [
            "/gw/../secret",
            "/gw/./x",
            "/gw/..",
            "/gw/.",
            "/gw/%2e%2e/x",
            "/gw/%2E%2E/x",
            "/gw/.%2E/x",
            "/gw/%2e./x",
            "/gw/%2e",
            "/gw/..;/x",
            "/gw/.;x/y",
            "/gw/%252e%252e/x",
            "/gw/%25252e/x",
        ] {
            assert_eq!(check(path), Err(PathRefusal::DotSegment), "{path}");
        }
    }

    #[test]
    fn encoded_separators_and_backslashes_are_refused() {
        for path in [
            "/gw/a%2fb",
            "/gw/a%2Fb",
            "/gw/%2F",
            "/gw/a%5cb",
            "/gw/a%5Cb",
            "/gw/a\\b",
            "/gw/..\\x",
            "/gw/a%252fb",
        ] {
            assert_eq!(check(path), Err(PathRefusal::Separator), "{path}");
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/",
            "/gw/v1/chat/completions",
            "/gw/a..b/.hidden/...x/..x/x..",
            "/gw//double",
            "/gw/%20space/%41",
            "/gw/100%",
            "/gw/%zz/%2",
            "/gw/a;b=c",
        ] {
            assert_eq!(check(path), Ok(()), "{path}");
        }
    }
}
