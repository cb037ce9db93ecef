//! Sequential-access detection for one open file, with several read cursors: players read one
//! file at several places at once (an audio and a video track, an index at the end), so each
//! cursor keeps its own run and window instead of every switch counting as a seek.
//!
//! A read that continues where a cursor's reads ended (within a slack that absorbs the
//! kernel's own read-ahead arriving slightly out of order) doubles that cursor's window, up to
//! a maximum. A read that continues no cursor starts a new one with no window (replacing the
//! least recently used when all [`CURSORS`] are taken); one at offset 0 starts with the
//! minimum window, as a program reading a file from its start usually reads it all.

/// Cursors kept per open file.
pub const CURSORS: usize = 4;

/// Reads shorter than this are the program's own (the kernel's read-ahead sends larger ones),
/// so they continue a cursor only when they start close to where it ended.
const SMALL_READ: u64 = 32 << 10;

/// How far from a cursor's frontier a read of `len` bytes may start and still continue it.
/// Large reads get a MiB at least: the kernel's read-ahead sends several at once and they can
/// arrive out of order. Small ones get four times their length: with a MiB, one random 4 KiB
/// read in a hundred of a 512 MiB file landed near one of the four cursors and fetched whole
/// chunks, the tail of random reads.
fn slack_for(len: u64) -> u64 {
    if len < SMALL_READ {
        4 * len
    } else {
        (4 * len).max(1 << 20)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    /// Highest end offset read so far in this sequential run.
    frontier: u64,
    window: u64,
    /// Value of the file's read counter when this cursor was last used.
    used: u64,
}

/// Read-ahead state of one open file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAhead {
    cursors: Vec<Cursor>,
    reads: u64,
    /// Window of the cursor the last read moved.
    pub window: u64,
    max: u64,
    min: u64,
}

impl ReadAhead {
    pub fn new(min: u64, max: u64) -> Self {
        ReadAhead { cursors: Vec::with_capacity(CURSORS), reads: 0, window: 0, max, min }
    }

    /// Records a read and returns the window of bytes to prefetch past it (0: none).
    pub fn on_read(&mut self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len);
        let slack = slack_for(len);
        self.reads += 1;
        let continues =
            |c: &Cursor| offset <= c.frontier.saturating_add(slack) && end.saturating_add(slack) >= c.frontier;
        // The nearest cursor this read continues, if any.
        let found =
            self.cursors.iter().enumerate().filter(|(_, c)| continues(c)).min_by_key(|(_, c)| c.frontier.abs_diff(end));
        let window = match found.map(|(i, _)| i) {
            Some(i) => {
                let c = &mut self.cursors[i];
                c.window = if c.window == 0 { self.min } else { (c.window * 2).min(self.max) };
                c.frontier = c.frontier.max(end);
                c.used = self.reads;
                c.window
            }
            None => {
                let fresh = Cursor { frontier: end, window: if offset == 0 { self.min } else { 0 }, used: self.reads };
                let window = fresh.window;
                if self.cursors.len() < CURSORS {
                    self.cursors.push(fresh);
                } else if let Some(lru) = self.cursors.iter_mut().min_by_key(|c| c.used) {
                    *lru = fresh;
                }
                window
            }
        };
        self.window = window;
        window
    }

    /// Where the most recently used cursor has read up to.
    pub fn frontier(&self) -> u64 {
        self.cursors.iter().max_by_key(|c| c.used).map_or(0, |c| c.frontier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_on_sequential_and_resets_on_seek() {
        let mut ra = ReadAhead::new(128 << 10, 8 << 20);
        assert_eq!(ra.on_read(0, 128 << 10), 128 << 10);
        assert_eq!(ra.on_read(128 << 10, 128 << 10), 256 << 10);
        // Kernel read-ahead arriving slightly out of order is still sequential.
        assert_eq!(ra.on_read(384 << 10, 128 << 10), 512 << 10);
        assert_eq!(ra.on_read(256 << 10, 128 << 10), 1 << 20);
        for _ in 0..10 {
            ra.on_read(ra.frontier(), 128 << 10);
        }
        assert_eq!(ra.window, 8 << 20, "window is bounded");
        assert_eq!(ra.on_read(500 << 20, 4096), 0, "a seek starts a cursor without a window");
        assert_eq!(ra.on_read((500 << 20) + 4096, 4096), 128 << 10);
    }

    #[test]
    fn interleaved_streams_keep_their_windows() {
        let mut ra = ReadAhead::new(128 << 10, 8 << 20);
        let (video, audio, index) = (0u64, 300u64 << 20, 900u64 << 20);
        let step = 128u64 << 10;
        let mut last = (0, 0, 0);
        for i in 0..8u64 {
            let v = ra.on_read(video + i * step, step);
            let a = ra.on_read(audio + i * step, step);
            let x = ra.on_read(index + i * step, step);
            last = (v, a, x);
        }
        assert_eq!(last, (8 << 20, 8 << 20, 8 << 20), "three interleaved runs all reach the maximum");
        // A fifth place pushes out the least recently used cursor only.
        ra.on_read(100 << 20, 4096);
        ra.on_read(600 << 20, 4096);
        assert_eq!(ra.on_read(index + 8 * step, step), 8 << 20, "the index run survives");
        assert_eq!(ra.on_read(video + 8 * step, step), 0, "the oldest run was replaced");
    }

    #[test]
    fn small_reads_open_a_window_only_where_a_run_goes_on() {
        let mut ra = ReadAhead::new(128 << 10, 8 << 20);
        // Random 4 KiB reads a few hundred KiB apart: near each other, but no run.
        for i in 0..64u64 {
            let offset = (100 << 20) + (i * 7 % 64) * (300 << 10);
            assert_eq!(ra.on_read(offset, 4096), 0, "read at {offset}");
        }
        // A program reading 4 KiB after 4 KiB (the page cache bypassed) is a run.
        let start = 400u64 << 20;
        assert_eq!(ra.on_read(start, 4096), 0);
        assert_eq!(ra.on_read(start + 4096, 4096), 128 << 10);
        assert_eq!(ra.on_read(start + 2 * 4096, 4096), 256 << 10);
    }

    #[test]
    fn random_reads_never_open_a_window() {
        let mut ra = ReadAhead::new(128 << 10, 8 << 20);
        // Distinct 16 MiB slots in a scrambled order (an odd multiplier permutes them).
        for i in 0..200u64 {
            let offset = (i * 2_654_435_761 % 4096) * (16 << 20) + 4096;
            assert_eq!(ra.on_read(offset, 4096), 0, "read at {offset}");
        }
    }
}
