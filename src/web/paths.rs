//! The path of a `/files/<catalog>/<path>` URL, decoded and checked segment by segment from the
//! raw (still percent-encoded) request path, so that an encoded slash cannot pass for a
//! separator. A segment that is empty, `.` or `..`, or that decodes to a slash, a backslash, a
//! NUL or another control character, or to invalid UTF-8, is refused. What is left is only
//! ever a key into the catalog's listing, never a file system path.

/// Longest raw path accepted.
const MAX_PATH: usize = 4096;

/// A checked `/files` target: the catalog's folder name and the path inside it.
#[derive(Debug, PartialEq, Eq)]
pub struct FilePath {
    pub catalog: String,
    pub path: String,
}

/// Decodes `raw` (the request path after `/files/`). The error is a short reason for a 400.
pub fn parse(raw: &str) -> Result<FilePath, &'static str> {
    if raw.len() > MAX_PATH {
        return Err("path too long");
    }
    let mut segments = Vec::new();
    for encoded in raw.split('/') {
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
        let segment = String::from_utf8(bytes).map_err(|_| "path is not valid UTF-8")?;
        if segment.is_empty() {
            return Err("empty path segment");
        }
        if segment == "." || segment == ".." {
            return Err("'.' and '..' are not allowed in paths");
        }
        if segment.contains(['/', '\\']) {
            return Err("encoded slashes are not allowed in paths");
        }
        if segment.chars().any(char::is_control) {
            return Err("control characters are not allowed in paths");
        }
        segments.push(segment);
    }
    if segments.len() < 2 {
        return Err("give /files/<catalog>/<path of a file>");
    }
    let catalog = segments.remove(0);
    Ok(FilePath { catalog, path: segments.join("/") })
}

/// Percent-encodes a catalog path for a URL, segment by segment (slashes kept).
pub fn encode(path: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    path.split('/').map(|s| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_paths_decode() {
        assert_eq!(
            parse("media/films/A%20b%C3%A9.mp4"),
            Ok(FilePath { catalog: "media".into(), path: "films/A bé.mp4".into() })
        );
        assert_eq!(encode("films/A bé.mp4"), "films/A%20b%C3%A9.mp4");
        assert_eq!(parse(&format!("media/{}", encode("x/%2F y?.txt"))).unwrap().path, "x/%2F y?.txt");
    }

    #[test]
    fn bad_paths_are_refused() {
        for bad in [
            "media",
            "media/",
            "media//x",
            "media/../x",
            "media/%2e%2e/x",
            "media/a%2Fb",
            "media/a%2fb",
            "media/a%5Cb",
            "media/a%00b",
            "media/a%0Ab",
            "media/%FF",
            "../etc/passwd",
            "media/.",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        assert!(parse(&"a/".repeat(3000)).is_err());
    }
}
