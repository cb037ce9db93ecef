//! Sequential-access detection for one open file. Reads that continue where the last ones
//! ended (within a slack that absorbs the kernel's own read-ahead arriving slightly out of
//! order) double the window, up to a maximum; anything else is a seek and resets it to none.

/// Read-ahead state of one open file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAhead {
    /// Highest end offset read so far in the current sequential run.
    frontier: u64,
    pub window: u64,
    max: u64,
    min: u64,
}

impl ReadAhead {
    pub fn new(min: u64, max: u64) -> Self {
        ReadAhead { frontier: 0, window: 0, max, min }
    }

    /// Records a read and returns the window of bytes to prefetch past it (0: none).
    pub fn on_read(&mut self, offset: u64, len: u64) -> u64 {
        let end = offset + len;
        let slack = (4 * len).max(1 << 20);
        let sequential = offset <= self.frontier.saturating_add(slack) && end + slack >= self.frontier;
        if sequential && (self.frontier > 0 || offset == 0) {
            self.window = if self.window == 0 { self.min } else { (self.window * 2).min(self.max) };
        } else {
            self.window = 0;
        }
        self.frontier = if sequential { self.frontier.max(end) } else { end };
        self.window
    }

    /// Where the current sequential run has read up to.
    pub fn frontier(&self) -> u64 {
        self.frontier
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
            ra.on_read(ra.frontier, 128 << 10);
        }
        assert_eq!(ra.window, 8 << 20, "window is bounded");
        assert_eq!(ra.on_read(500 << 20, 4096), 0, "a seek resets the window");
        assert_eq!(ra.on_read((500 << 20) + 4096, 4096), 128 << 10);
    }
}
