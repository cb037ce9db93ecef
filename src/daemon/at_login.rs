//! Which own catalogs `up` serves: `$NATSTER_HOME/at-login.json`, `{"serve": ["media", …]}`,
//! kept by `catalog new --serve` and `catalog serve --at-login|--not-at-login`. A small file of
//! its own rather than a field in each catalog file, so `up` learns what to serve without
//! reading every (possibly large) index each time the home changes.

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::context::Home;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtLogin {
    #[serde(default)]
    pub serve: Vec<String>,
}

impl AtLogin {
    pub fn path(home: &Home) -> PathBuf {
        home.path().join("at-login.json")
    }

    /// The marks; none if the file does not exist.
    pub fn load(home: &Home) -> Result<AtLogin> {
        Ok(crate::store::load_json(&Self::path(home))?.unwrap_or_default())
    }

    /// Marks (or unmarks) `catalog` for serving by `up`; true if that changed anything.
    pub fn mark(home: &Home, catalog: &str, serve: bool) -> Result<bool> {
        let mut marks = Self::load(home)?;
        let had = marks.serve.iter().any(|c| c == catalog);
        if had == serve {
            return Ok(false);
        }
        if serve {
            marks.serve.push(catalog.to_string());
            marks.serve.sort();
        } else {
            marks.serve.retain(|c| c != catalog);
        }
        home.ensure()?;
        crate::store::write_atomic(&Self::path(home), &serde_json::to_vec_pretty(&marks)?, 0o600)?;
        Ok(true)
    }

    pub fn serves(&self, catalog: &str) -> bool {
        self.serve.iter().any(|c| c == catalog)
    }
}
