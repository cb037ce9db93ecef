//! The Natster imports of an account JWT, recognised by their subjects rather than their names
//! (`nsc` users choose names freely). Two kinds:
//!
//! - **Per owner** (what `catalog import` adds): service `<ME>.natster.catalog.>` mapped to
//!   the local `natster.from.<O>.catalog.>`, stream `<ME>.natster.media.*.*` mapped to
//!   `natster.from.<O>.media.*.*`. Two imports per owner account `O`, however many of its
//!   catalogs are read, so the JWT grows with owners, not catalogs; each owner has a local
//!   namespace of its own, so two owners' catalogs of one name never clash.
//! - **Per catalog** (the original's): service `<ME>.natster.catalog.<C>.>` on the local
//!   `natster.catalog.<C>.>`, stream `<ME>.natster.media.<C>.*` on `natster.media.<C>.*`.
//!
//! What nats-server (2.9.10 and 2.15.1, `tests/imports_scale.rs`) does with them:
//! - an import's `subject` is the exporter's subject, `local_subject` the importer's, their
//!   wildcards mapped in order (`>` to `>`, each `*` to a `*`); a local subject with fewer
//!   wildcards than the subject is a validation error that refuses the whole JWT;
//! - an import must be a subset of an export, with the importer's own key at the export's
//!   account token position. Anything else (another key, a `*` there, a wildcard import of an
//!   exporter that exports only named catalogs) is taken with the JWT (200) and left inert;
//! - so who may read which catalog stays the owner's share list: the per-owner import reaches
//!   every catalog name, and the owner's catalog server answers each request by the account
//!   in its first token, exactly as it does for per-catalog imports.
//!
//! Per-catalog imports remain for two cases: an owner whose account exports only named
//! catalogs (a per-owner import of it is inert), and software that knows only the original's
//! unaliased subjects (the original CLI and web UI in the same account), besides contexts
//! written before per-owner imports.

use anyhow::{anyhow, bail, Result};

use super::jwt::{ExportType, Import};
use super::operator::check_account_key;
use super::sh_quote;
use crate::protocol::{owner_prefix, validate_catalog_name};

/// The catalog a per-catalog Natster import of account `importer_key` is for, recognised by
/// its remote subject (`<ME>.natster.catalog.<C>.>` for the service, `<ME>.natster.media.<C>.*`
/// for the stream).
pub fn imported_catalog<'a>(import: &'a Import, importer_key: &str) -> Option<&'a str> {
    let rest = import.subject.strip_prefix(importer_key)?.strip_prefix('.')?;
    let catalog = match import.kind {
        ExportType::Service => rest.strip_prefix("natster.catalog.")?.strip_suffix(".>")?,
        ExportType::Stream => rest.strip_prefix("natster.media.")?.strip_suffix(".*")?,
    };
    validate_catalog_name(catalog).is_ok().then_some(catalog)
}

/// The owner a per-owner Natster import of account `importer_key` reads from: both its remote
/// and its local subject are the ones [`owner_imports`] writes.
pub fn imported_owner<'a>(import: &'a Import, importer_key: &str) -> Option<&'a str> {
    let [service, stream] = owner_imports(importer_key, &import.account).ok()?;
    let expected = match import.kind {
        ExportType::Service => service,
        ExportType::Stream => stream,
    };
    (import.subject == expected.subject && import.local_subject == expected.local_subject && import.to.is_none())
        .then_some(import.account.as_str())
}

/// The two imports that let account `importer_key` read catalog `catalog` of `owner_key`:
/// service `natster_<C>` and stream `natster_<C>_media`.
pub fn catalog_imports(importer_key: &str, catalog: &str, owner_key: &str) -> Result<[Import; 2]> {
    validate_catalog_name(catalog).map_err(|e| anyhow!(e))?;
    check_account_key(importer_key, "importing account key")?;
    check_account_key(owner_key, "owner account key")?;
    Ok([
        Import {
            name: format!("natster_{catalog}"),
            subject: format!("{importer_key}.natster.catalog.{catalog}.>"),
            account: owner_key.to_string(),
            local_subject: Some(format!("natster.catalog.{catalog}.>")),
            to: None,
            kind: ExportType::Service,
        },
        Import {
            name: format!("natster_{catalog}_media"),
            subject: format!("{importer_key}.natster.media.{catalog}.*"),
            account: owner_key.to_string(),
            local_subject: Some(format!("natster.media.{catalog}.*")),
            to: None,
            kind: ExportType::Stream,
        },
    ])
}

/// The two imports that let account `importer_key` reach every catalog of `owner_key` (each
/// still refused unless the owner shares it): service `natster_from_<O8>` and stream
/// `natster_from_<O8>_media`, on local subjects under [`owner_prefix`].
pub fn owner_imports(importer_key: &str, owner_key: &str) -> Result<[Import; 2]> {
    check_account_key(importer_key, "importing account key")?;
    check_account_key(owner_key, "owner account key")?;
    if importer_key == owner_key {
        bail!("account {owner_key} cannot import from itself: it reads its own catalogs without imports");
    }
    let prefix = owner_prefix(owner_key);
    let short = &owner_key[..8];
    Ok([
        Import {
            name: format!("natster_from_{short}"),
            subject: format!("{importer_key}.natster.catalog.>"),
            account: owner_key.to_string(),
            local_subject: Some(format!("{prefix}.catalog.>")),
            to: None,
            kind: ExportType::Service,
        },
        Import {
            name: format!("natster_from_{short}_media"),
            subject: format!("{importer_key}.natster.media.*.*"),
            account: owner_key.to_string(),
            local_subject: Some(format!("{prefix}.media.*.*")),
            to: None,
            kind: ExportType::Stream,
        },
    ])
}

fn nsc_lines(account_name: &str, imports: &[Import]) -> Vec<String> {
    imports
        .iter()
        .map(|i| {
            let mut line = format!(
                "nsc add import --account {} --name {} --src-account {} --remote-subject {} --local-subject {}",
                sh_quote(account_name),
                sh_quote(&i.name),
                i.account,
                sh_quote(&i.subject),
                sh_quote(i.local_subject.as_deref().unwrap_or(&i.subject)),
            );
            if i.kind == ExportType::Service {
                line.push_str(" --service");
            }
            line
        })
        .collect()
}

/// For an account this operator does not manage (an `nsc` operator's): the two
/// `nsc add import` command lines that add the imports of catalog `catalog` from `owner_key`.
pub fn nsc_import_commands(
    account_name: &str,
    account_key: &str,
    catalog: &str,
    owner_key: &str,
) -> Result<Vec<String>> {
    if owner_key == account_key {
        bail!("account {account_key} owns catalog '{catalog}': it needs no import");
    }
    Ok(nsc_lines(account_name, &catalog_imports(account_key, catalog, owner_key)?))
}

/// Like [`nsc_import_commands`], for the per-owner imports of `owner_key` (once per owner).
pub fn nsc_owner_import_commands(account_name: &str, account_key: &str, owner_key: &str) -> Result<Vec<String>> {
    Ok(nsc_lines(account_name, &owner_imports(account_key, owner_key)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_imports_are_recognised_by_both_subjects() {
        let me = nkeys::KeyPair::new_account().public_key();
        let owner = nkeys::KeyPair::new_account().public_key();
        let [service, stream] = owner_imports(&me, &owner).unwrap();
        assert_eq!(service.subject, format!("{me}.natster.catalog.>"));
        assert_eq!(service.local_subject, Some(format!("natster.from.{owner}.catalog.>")));
        assert_eq!(stream.subject, format!("{me}.natster.media.*.*"));
        assert_eq!(stream.local_subject, Some(format!("natster.from.{owner}.media.*.*")));
        assert_eq!(imported_owner(&service, &me), Some(owner.as_str()));
        assert_eq!(imported_owner(&stream, &me), Some(owner.as_str()));
        assert_eq!(imported_owner(&service, &owner), None, "another importer's");
        let remapped = Import { local_subject: Some("elsewhere.>".into()), ..service.clone() };
        assert_eq!(imported_owner(&remapped, &me), None, "not on our local subjects");
        let [per_catalog, _] = catalog_imports(&me, "c", &owner).unwrap();
        assert_eq!(imported_owner(&per_catalog, &me), None);
        assert_eq!(imported_catalog(&per_catalog, &me), Some("c"));
        assert_eq!(imported_catalog(&service, &me), None);
        assert!(owner_imports(&me, &me).is_err());
        assert!(owner_imports(&me, "AXX").is_err());
    }
}
