// Natster web UI: a small single-page app over /api and /files. No dependencies, no build.
// Routes live in the hash: #/ (catalogs), #/c/<id>[/<folder>] (a catalog), #/f/<id>/<path> (a file).
// Everything from the server is put in the page as text (never as HTML).
'use strict';

const view = document.getElementById('view');
const state = { catalogs: null, inbox: null, me: null, catalog: null, files: null, route: null, filter: '' };

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function size(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

const short = (key) => key && key.length > 16 ? `${key.slice(0, 8)}…${key.slice(-4)}` : key;
const files = (n) => `${n} file${n === 1 ? '' : 's'}`;
const who = (acct) => acct.name ? `${acct.name} (${short(acct.key)})` : short(acct.key);
const enc = (path) => path.split('/').map(encodeURIComponent).join('/');
const dec = (path) => path.split('/').map(decodeURIComponent).join('/');

function toast(text, bad) {
  const t = document.getElementById('toast');
  t.textContent = text;
  t.classList.toggle('error', !!bad);
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 4000);
}

async function api(path, options) {
  const res = await fetch(path, Object.assign({ credentials: 'same-origin' }, options));
  if (res.status === 401) throw new Error('Not logged in: open the login link that natster-mount web printed.');
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `${res.status} ${res.statusText}`);
  return body;
}

function parseRoute() {
  const hash = location.hash.replace(/^#\/?/, '');
  const [kind, id, ...rest] = hash.split('/');
  try {
    if (kind === 'c' && id) return { kind: 'catalog', id: decodeURIComponent(id), folder: dec(rest.join('/')) };
    if (kind === 'f' && id && rest.length) return { kind: 'file', id: decodeURIComponent(id), path: dec(rest.join('/')) };
  } catch (e) { /* a malformed hash shows the list */ }
  return { kind: 'list' };
}

function dot(c) {
  const cls = c.online === true ? 'online' : c.online === false ? 'offline' : 'unknown';
  const title = c.online === true ? 'online' : c.online === false ? 'offline' : 'online status unknown (no global service)';
  return h('span', { class: `dot ${cls}`, title });
}

function renderList() {
  const cs = state.catalogs || [];
  const items = cs.map((c) => h('li', { class: 'catalog', 'data-id': c.id },
    h('a', { href: `#/c/${encodeURIComponent(c.id)}` },
      dot(c),
      h('div', { class: 'grow' },
        h('div', { class: 'name' }, c.id, ' ', c.own ? h('span', { class: 'badge' }, 'yours') : null),
        h('div', { class: 'meta' },
          `${c.own ? 'shared by you' : `from ${who(c.owner)}`} · ${files(c.files)} · ${size(c.bytes)}`,
          c.revision ? ` · revision ${c.revision}` : '',
          c.reach !== 'reachable' ? ` · ${c.reach}` : '')),
      h('span', { class: 'right' }, c.verified))));
  view.replaceChildren(
    h('h1', {}, 'Catalogs'),
    cs.length ? h('ul', { class: 'list', id: 'catalogs' }, items)
      : h('p', { class: 'muted' }, 'No catalogs yet: create one with natster-mount catalog new, or import one shared with you.'),
    inboxSection());
}

// Shares offered to this account and not imported yet (from the global service).
function inboxSection() {
  const inbox = state.inbox;
  if (!inbox || !inbox.available) {
    return h('p', { class: 'muted small', id: 'inbox-unavailable' },
      'Inbox unavailable: no global service answers. Sharing and reading work without it.');
  }
  if (!inbox.pending.length) return null;
  const importShare = async (p, button) => {
    button.disabled = true;
    try {
      const r = await api('/api/inbox/import', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ catalog: p.catalog, owner: p.owner.key }) });
      toast(r.message);
      await refresh();
    } catch (e) { toast(e.message, true); button.disabled = false; }
  };
  const rows = inbox.pending.map((p) => {
    const button = h('button', { type: 'button', class: 'import' }, 'Import');
    button.addEventListener('click', () => importShare(p, button));
    return h('li', { class: 'pending', 'data-catalog': p.catalog, 'data-owner': p.owner.key },
      h('div', { class: 'row' },
        h('div', { class: 'grow' }, h('div', { class: 'name' }, p.catalog), h('div', { class: 'meta' }, `from ${who(p.owner)}`)),
        button));
  });
  return h('section', { id: 'inbox' }, h('h2', {}, 'Shared with you, not imported yet'), h('ul', { class: 'list' }, rows));
}

function crumbs(id, folder) {
  const parts = folder ? folder.split('/') : [];
  const out = [h('a', { href: '#/' }, 'Catalogs'), ' / ', h('a', { href: `#/c/${encodeURIComponent(id)}` }, id)];
  parts.forEach((p, i) => {
    out.push(' / ', h('a', { href: `#/c/${encodeURIComponent(id)}/${enc(parts.slice(0, i + 1).join('/'))}` }, p));
  });
  return h('nav', { class: 'crumbs' }, out);
}

// A short label for the kind of file (text, so it needs no emoji font).
function kindOf(mime) {
  if (mime.startsWith('video/')) return ['video', 'VID'];
  if (mime.startsWith('audio/')) return ['audio', 'AUD'];
  if (mime.startsWith('image/')) return ['image', 'IMG'];
  if (mime === 'application/pdf') return ['pdf', 'PDF'];
  if (mime.startsWith('text/')) return ['text', 'TXT'];
  return ['other', 'BIN'];
}
const kind = (mime) => { const [cls, label] = kindOf(mime); return h('span', { class: `kind ${cls}` }, label); };

function sharePanel(c) {
  if (!c.own) return null;
  const input = h('input', { type: 'text', id: 'share-account', placeholder: 'account key (A…) or local account name', autocomplete: 'off', maxlength: 128 });
  const submit = async (ev) => {
    ev.preventDefault();
    const account = input.value.trim();
    if (!account) return;
    try {
      const r = await api(`/api/catalogs/${encodeURIComponent(c.id)}/share`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ account }) });
      input.value = '';
      toast(r.message);
      await refresh();
    } catch (e) { toast(e.message, true); }
  };
  const unshare = async (key) => {
    try {
      const r = await api(`/api/catalogs/${encodeURIComponent(c.id)}/unshare`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ account: key }) });
      toast(r.message);
      await refresh();
    } catch (e) { toast(e.message, true); }
  };
  const shared = (c.shared_with || []).map((a) => h('li', { class: 'share', 'data-key': a.key },
    h('div', { class: 'row' }, h('div', { class: 'grow' }, h('div', { class: 'name' }, a.name || short(a.key)), h('div', { class: 'meta mono' }, a.key)),
      h('button', { class: 'quiet', onclick: () => unshare(a.key) }, 'Unshare'))));
  return h('section', { id: 'sharing' },
    h('h2', {}, 'Shared with'),
    shared.length ? h('ul', { class: 'list', id: 'shares' }, shared) : h('p', { class: 'muted', id: 'shares' }, 'Only you.'),
    h('form', { class: 'tools', onsubmit: submit }, input, h('button', { type: 'submit' }, 'Share')));
}

function renderCatalog(route) {
  const c = state.catalog;
  if (!c) return;
  const prefix = route.folder ? `${route.folder}/` : '';
  const filter = state.filter.toLowerCase();
  const folders = new Map();
  const list = [];
  for (const f of state.files) {
    if (!f.path.startsWith(prefix)) continue;
    const rest = f.path.slice(prefix.length);
    if (filter) {
      if (rest.toLowerCase().includes(filter)) list.push([rest, f]);
    } else if (rest.includes('/')) {
      const dir = rest.split('/')[0];
      const entry = folders.get(dir) || { count: 0, bytes: 0 };
      entry.count++; entry.bytes += f.size;
      folders.set(dir, entry);
    } else list.push([rest, f]);
  }
  const rows = [];
  for (const [dir, info] of [...folders].sort()) {
    rows.push(h('li', { class: 'folder' }, h('a', { href: `#/c/${encodeURIComponent(c.id)}/${enc(prefix + dir)}` },
      h('span', { class: 'kind folder' }, 'DIR'), h('div', { class: 'grow' }, h('div', { class: 'name' }, dir), h('div', { class: 'meta' }, files(info.count))),
      h('span', { class: 'right size' }, size(info.bytes)))));
  }
  for (const [name, f] of list) {
    rows.push(h('li', { class: 'file', 'data-path': f.path }, h('a', { href: `#/f/${encodeURIComponent(c.id)}/${enc(f.path)}` },
      kind(f.mime), h('div', { class: 'grow' }, h('div', { class: 'name' }, name), h('div', { class: 'meta' }, f.mime)),
      h('span', { class: 'right' }, size(f.size)))));
  }
  const search = h('input', { type: 'search', id: 'filter', placeholder: 'Filter by name', value: state.filter,
    oninput: (e) => { state.filter = e.target.value; renderCatalog(route); const el = document.getElementById('filter'); el.focus(); el.setSelectionRange(el.value.length, el.value.length); } });
  view.replaceChildren(
    crumbs(c.id, route.folder),
    h('h1', {}, route.folder ? route.folder.split('/').pop() : c.id),
    h('p', { class: 'meta' }, dot(c), ' ', c.own ? 'Yours' : `From ${who(c.owner)}`, ` · ${files(c.files)} · ${size(c.bytes)}`,
      c.revision ? ` · revision ${c.revision}` : '', ` · ${c.reach} · ${c.verified}`),
    h('div', { class: 'tools' }, search),
    rows.length ? h('ul', { class: 'list', id: 'files' }, rows) : h('p', { class: 'muted' }, filter ? 'Nothing matches.' : 'This folder is empty.'),
    sharePanel(c));
}

async function textPreview(url, pre) {
  try {
    const res = await fetch(url, { headers: { range: 'bytes=0-262143' } });
    if (!res.ok) throw new Error(`${res.status} ${await res.text()}`);
    const text = await res.text();
    pre.textContent = text + (res.status === 206 && text.length >= 262000 ? '\n… (first 256 KiB)' : '');
  } catch (e) { pre.textContent = `Cannot show this file: ${e.message}`; }
}

function renderFile(route, keepViewer) {
  const c = state.catalog;
  const f = c && state.files.find((x) => x.path === route.path);
  if (!f) { view.replaceChildren(crumbs(route.id, ''), h('p', { class: 'error' }, 'No such file in this catalog.')); return; }
  const folder = f.path.includes('/') ? f.path.slice(0, f.path.lastIndexOf('/')) : '';
  const facts = h('dl', { class: 'facts', id: 'facts' },
    h('dt', {}, 'Size'), h('dd', {}, `${size(f.size)} (${f.size} bytes)`),
    h('dt', {}, 'Type'), h('dd', {}, f.mime),
    f.description ? [h('dt', {}, 'About'), h('dd', {}, f.description)] : null,
    h('dt', {}, 'From'), h('dd', {}, c.own ? 'you' : who(c.owner)),
    h('dt', {}, 'SHA-256'), h('dd', { class: 'mono' }, f.hash));
  if (keepViewer && document.getElementById('facts')) { document.getElementById('facts').replaceWith(facts); return; }
  let viewer;
  if (f.mime.startsWith('video/')) viewer = h('div', { class: 'viewer' }, h('video', { id: 'player', src: f.url, controls: true, preload: 'metadata', playsinline: true }));
  else if (f.mime.startsWith('audio/')) viewer = h('div', { class: 'viewer light' }, h('audio', { id: 'player', src: f.url, controls: true, preload: 'metadata' }));
  else if (f.mime.startsWith('image/') && f.mime !== 'image/svg+xml') viewer = h('div', { class: 'viewer' }, h('img', { id: 'image', src: f.url, alt: f.path }));
  else if (f.mime === 'application/pdf') viewer = h('div', { class: 'viewer light' }, h('iframe', { id: 'pdf', src: f.url, title: f.path }));
  else if (f.mime.startsWith('text/') || f.mime === 'application/json' || f.mime === 'image/svg+xml') {
    const pre = h('pre', { class: 'text', id: 'text' }, 'Loading…');
    textPreview(f.url, pre);
    viewer = h('div', { class: 'viewer light' }, pre);
  } else viewer = h('div', { class: 'card muted' }, 'No preview for this type; download it instead.');
  view.replaceChildren(
    crumbs(c.id, folder),
    h('h1', {}, f.path.split('/').pop()),
    viewer,
    h('div', { class: 'tools' }, h('a', { class: 'button', id: 'download', href: `${f.url}?download=1`, download: f.path.split('/').pop() }, 'Download')),
    facts);
}

async function loadCatalog(id) {
  const r = await api(`/api/catalogs/${encodeURIComponent(id)}`);
  state.catalog = r.catalog;
  state.files = r.files;
}

// Re-reads what the current page shows; a player keeps playing.
async function refresh(fromEvent) {
  const route = parseRoute();
  const same = state.route && JSON.stringify(state.route) === JSON.stringify(route);
  try {
    if (route.kind === 'list') {
      const [r, inbox] = await Promise.all([api('/api/catalogs'), api('/api/inbox').catch(() => null)]);
      state.catalogs = r.catalogs;
      state.me = r.me;
      state.inbox = inbox;
      renderList();
    } else {
      await loadCatalog(route.id);
      if (route.kind === 'catalog') renderCatalog(route);
      else renderFile(route, fromEvent && same);
    }
    state.route = route;
  } catch (e) {
    view.replaceChildren(h('p', { class: 'error' }, e.message));
  }
}

async function showMe() {
  try {
    const r = await api('/api/catalogs');
    const me = r.me || {};
    document.getElementById('me').textContent = me.name ? `${me.name} · ${short(me.key)}` : short(me.key || '');
  } catch (e) { /* the page itself shows the error */ }
}

function listen() {
  const live = document.getElementById('live');
  const es = new EventSource('/api/events');
  es.addEventListener('hello', () => live.classList.add('on'));
  for (const kind of ['catalogs', 'revision', 'shares', 'reachability', 'presence', 'resync']) {
    es.addEventListener(kind, () => refresh(true));
  }
  es.onerror = () => live.classList.remove('on');
}

// A one-time login link for another device (a phone), shown to copy or type.
async function anotherDevice() {
  const box = document.getElementById('link');
  try {
    const r = await api('/api/login-link', { method: 'POST' });
    box.replaceChildren(
      h('div', { class: 'small muted' }, 'Open this once on the other device (it must reach this address):'),
      h('div', { class: 'mono', id: 'link-url' }, r.url),
      h('button', { class: 'quiet', type: 'button', onclick: () => { box.hidden = true; } }, 'Close'));
    box.hidden = false;
  } catch (e) { toast(e.message, true); }
}

document.getElementById('another').addEventListener('click', anotherDevice);
window.addEventListener('hashchange', () => { state.filter = ''; refresh(false); });
showMe();
refresh(false);
listen();
