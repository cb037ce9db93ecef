//! The inbox and presence in the CLI: shares offered to this account that it has not imported
//! (from the global service's `my.shares`, compared with the context's imports), each with the
//! exact command that imports it; `catalog inbox`, `catalog import --all`, and the network part
//! of `catalog ls` (online or offline, and the revision, of every catalog shared with or by me).
//!
//! When the global service does not answer, `catalog ls` and `import --all` print one line
//! saying so and show what they know locally; `catalog inbox`, which has nothing else to show,
//! fails with that line.

use anyhow::{bail, Result};

use crate::cli::network::{global_client, unix_time, warn_unavailable};
use crate::cli::Globals;
use crate::context::Context;
use crate::global::client::{CallError, GlobalClient};
use crate::global::wire::Share;

/// Whether `share` is offered to `context`'s account by another one and not imported yet.
pub fn is_offer(context: &Context, share: &Share) -> bool {
    let Some(me) = context.account_public_key.as_deref() else { return false };
    share.to_account == me
        && share.from_account != me
        && !context.imports.iter().any(|i| i.catalog == share.catalog && i.owner == share.from_account)
}

/// Shares offered to this context's account that it has not imported.
pub async fn pending(g: &Globals, context: &Context) -> Result<Vec<Share>, CallError> {
    if context.account_public_key.is_none() {
        return Ok(Vec::new());
    }
    // Connected here, not through `global_client`: the caller says why in its own one line.
    let timeout = crate::cli::network::global_timeout(g);
    let nats = context.connect(timeout).await.map_err(|e| CallError::Unavailable(format!("{e:#}")))?;
    let client = GlobalClient::new(nats, timeout);
    crate::cli::network::flush(g, &client).await;
    let shares = client.my_shares().await?;
    Ok(shares.into_iter().filter(|s| is_offer(context, s)).collect())
}

fn status(share: &Share) -> String {
    let state = if share.catalog_online { "online" } else { "offline" };
    match (share.revision, &share.revision_id) {
        (0, _) => state.to_string(),
        (r, Some(id)) => format!("{state}, revision {r} ({id}, {})", unix_time(r)),
        (r, None) => format!("{state}, revision {r} ({})", unix_time(r)),
    }
}

fn offer_line(g: &Globals, share: &Share) -> String {
    format!(
        "  {} from {}, {}: natster-mount catalog import {} {}",
        share.catalog,
        crate::sharing::account_label(g, &share.from_account),
        if share.catalog_online { "online" } else { "offline" },
        share.catalog,
        share.from_account
    )
}

/// `catalog inbox`.
pub async fn catalog_inbox(g: &Globals) -> Result<()> {
    let context = g.load_context()?;
    if context.account_public_key.is_none() {
        bail!("context '{}' names no account, so nothing can be shared with it; see `natster-mount whoami`", g.context);
    }
    let offers = match pending(g, &context).await {
        Ok(o) => o,
        Err(e) => bail!("the inbox is unavailable: {e}; `natster-mount catalog import NAME OWNER` still works"),
    };
    if offers.is_empty() {
        outln!("inbox: nothing pending (every catalog shared with you is imported)");
    } else {
        outln!("inbox: {} catalog(s) shared with you, not imported yet:", offers.len());
    }
    for offer in &offers {
        outln!("{}", offer_line(g, offer));
    }
    Ok(())
}

/// `catalog ls`: the local part (`sharing::catalog_ls`), then presence and the inbox.
pub async fn catalog_ls(g: &Globals) -> Result<()> {
    crate::sharing::catalog_ls(g)?;
    let context = g.load_context()?;
    let Some(me) = context.account_public_key.clone() else { return Ok(()) };
    let Some(client) = global_client(g, &context).await else { return Ok(()) };
    crate::cli::network::flush(g, &client).await;
    let shares = match client.my_shares().await {
        Ok(s) => s,
        Err(e) => {
            warn_unavailable(&e);
            return Ok(());
        }
    };
    // Presence of each catalog once: mine that I share, and those shared with me.
    let mut seen = std::collections::BTreeSet::new();
    let mut presence = Vec::new();
    for share in &shares {
        if seen.insert((share.from_account.clone(), share.catalog.clone())) {
            presence.push(share);
        }
    }
    if !presence.is_empty() {
        outln!("online (from the global service):");
    }
    for share in presence {
        let whose = if share.from_account == me {
            "mine".to_string()
        } else {
            format!("from {}", crate::sharing::account_label(g, &share.from_account))
        };
        outln!("  {} {whose}: {}", share.catalog, status(share));
    }
    let offers: Vec<&Share> = shares.iter().filter(|s| is_offer(&context, s)).collect();
    if !offers.is_empty() {
        outln!("shared with me, not imported yet:");
    }
    for offer in offers {
        outln!("{}", offer_line(g, offer));
    }
    Ok(())
}

/// `catalog import --all`: imports every pending share; reports each, fails if any failed.
pub async fn import_all(g: &Globals, external: bool) -> Result<()> {
    let context = g.load_context()?;
    let offers = match pending(g, &context).await {
        Ok(o) => o,
        Err(e) => bail!("the inbox is unavailable, so --all does not know what to import: {e}; import each with `natster-mount catalog import NAME OWNER`"),
    };
    if offers.is_empty() {
        outln!("nothing to import: every catalog shared with you is imported");
        return Ok(());
    }
    let mut failed = 0;
    for offer in &offers {
        if let Err(e) = crate::sharing::catalog_import(g, &offer.catalog, &offer.from_account, external, false).await {
            eprintln!("error: catalog '{}' from {}: {e:#}", offer.catalog, offer.from_account);
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} import(s) failed (see above)", offers.len());
    }
    Ok(())
}
