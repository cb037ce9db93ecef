//! The owner's share list: which other accounts may read a catalog. Kept beside the catalog as
//! `$NATSTER_HOME/<catalog>.shares.json`; a running catalog server re-reads it when it changes,
//! so `share`/`unshare` take effect without a restart.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::context::Home;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareList {
    pub catalog: String,
    #[serde(default)]
    pub accounts: Vec<String>,
}

impl ShareList {
    pub fn path(home: &Home, catalog: &str) -> PathBuf {
        home.path().join(format!("{catalog}.shares.json"))
    }

    /// The list for `catalog`; a missing file is an empty list (owner only).
    pub fn load(home: &Home, catalog: &str) -> Result<ShareList> {
        let path = Self::path(home, catalog);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a valid share list; fix or delete it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(ShareList { catalog: catalog.to_string(), accounts: Vec::new() })
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save(&self, home: &Home) -> Result<()> {
        home.ensure()?;
        let path = Self::path(home, &self.catalog);
        let mut tmp = tempfile::NamedTempFile::new_in(home.path())?;
        serde_json::to_writer_pretty(&mut tmp, self)?;
        tmp.persist(&path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    pub fn allows(&self, account: &str) -> bool {
        self.accounts.iter().any(|a| a == account)
    }
}

/// A share list that reloads itself when its file changes (checked by mtime, one `stat` per
/// call). A list that fails to parse denies everyone but the owner until it is fixed.
pub struct LiveShareList {
    home: Home,
    catalog: String,
    /// The file's identity when last loaded: None before the first load, Some(None) while
    /// there is no file (so a missing list is not re-read, and logged, on every request).
    seen: Option<Option<(SystemTime, u64, u64)>>,
    list: ShareList,
}

impl LiveShareList {
    pub fn new(home: Home, catalog: &str) -> Self {
        let mut live = LiveShareList {
            home,
            catalog: catalog.to_string(),
            seen: None,
            list: ShareList { catalog: catalog.to_string(), accounts: Vec::new() },
        };
        live.refresh();
        live
    }

    fn refresh(&mut self) {
        let path = ShareList::path(&self.home, &self.catalog);
        // Every save is a rename, so the inode changes even within one mtime tick.
        let identity = fs::metadata(&path).ok().and_then(|m| Some((m.modified().ok()?, m.ino(), m.len())));
        if self.seen == Some(identity) {
            return;
        }
        self.seen = Some(identity);
        self.list = match ShareList::load(&self.home, &self.catalog) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e:#}; sharing with nobody until it is fixed");
                ShareList { catalog: self.catalog.clone(), accounts: Vec::new() }
            }
        };
        tracing::info!(catalog = %self.catalog, accounts = self.list.accounts.len(), "share list loaded");
    }

    pub fn allows(&mut self, account: &str) -> bool {
        self.refresh();
        self.list.allows(account)
    }
}
