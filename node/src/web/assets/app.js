// Samverkan's web app: one page, drawn from the node's JSON API; redrawn
// when the node's data changes (server-sent events), without a reload.
// Swedish first, English selectable. No framework, nothing from the internet.
'use strict';

const TEXT = {
  sv: {
    skip: 'Hoppa till innehållet', docs: 'Dokument', activities: 'Aktiviteter', language: 'Språk', menu: 'Huvudmeny',
    myDocs: 'Mina dokument', title: 'Titel', kind: 'Typ', parties: 'Parter', status: 'Status', conflicts: 'Konflikter',
    sync: 'Synk', none: 'Inga', noDocs: 'Inga dokument ännu. Skapa ett nedan.',
    newDoc: 'Nytt dokument', create: 'Skapa', own: '(vi)',
    draft: 'utkast', awaiting_signatures: 'väntar på underskrift', approved: 'godkänd',
    changed_since_approval: 'ändrad efter godkännande',
    synced: 'synkad', waiting: 'ändringar väntar', lastSync: 'senast synkad', never: 'aldrig',
    relayReachable: 'relay nåbar', relayUnreachable: 'relay inte nåbar', yes: 'ja', no: 'nej',
    offlineOnly: 'ingen synk här (samverkan-node ui): endast lokalt', notSynced: 'synkas inte',
    overlaps: 'överlappande ändringar',
    document: 'Dokumentet', fields: 'Uppgifter', save: 'Spara', saved: 'Sparat', saving: 'Sparar…',
    periodStart: 'Gäller från', periodEnd: 'Gäller till', place: 'Ort', date: 'Datum', scope: 'Omfattning',
    goals: 'Mål', addGoal: 'Lägg till mål', goal: 'Mål', remove: 'Ta bort',
    activity: 'Aktivitet', owners: 'Ansvariga (separera med ;)', due: 'Klart (datum, kvartal 2026-Q2 eller löpande)',
    followupMethod: 'Uppföljningsmetod', addActivity: 'Lägg till aktivitet', what: 'Vad',
    followups: 'Uppföljning', addFollowup: 'Lägg till uppföljning', text: 'Text', forActivity: 'Gäller aktivitet',
    body: 'Brödtext', saveBody: 'Spara texten',
    bodyHelp: 'Texten sparas som en minimal ändring mot versionen du började från; samtidiga ändringar från andra behålls.',
    conflictsTitle: 'Konflikter att lösa', conflictHelp: 'Samtidiga ändringar gav olika värden. Välj det som ska gälla.',
    keepThis: 'Behåll detta', by: 'av', keepMerged: 'Behåll sammanslagen text', merged: 'Sammanslagen', paragraph: 'stycke',
    overlapHelp: 'Två personer ändrade samma ord samtidigt. Texterna slogs ihop tecken för tecken; välj vilken version som ska gälla.',
    approval: 'Godkännande', required: 'Krävs', signedBy: 'Undertecknad av', missing: 'Saknas', inForce: 'Gällande version',
    pending: 'Väntar på fler underskrifter', withdrawn: 'Återkallat', awaitingReceipt: 'Väntar på relayns kvitto (räknas efter synk)',
    signer: 'Undertecknare', passphrase: 'Lösenfras för nyckeln', approve: 'Godkänn nuvarande version', withdraw: 'Återkalla',
    noSigners: 'Inga undertecknare på den här noden (samverkan-node signer new).',
    addSignatory: 'Kräv underskrift', org: 'Organisation', role: 'Roll (t.ex. Landshövding)', name: 'Namn',
    signatories: 'Underskrifter som krävs', diffSigned: 'Visa ändringar mot undertecknad version', noChanges: 'Inga ändringar sedan godkännandet.',
    exportBundle: 'Exportera och verifiera signerat paket', bundleOk: 'Paketet är skrivet och verifierat:',
    history: 'Historik', historyOf: 'Historik för', showVersion: 'Visa denna version', versionAt: 'Version vid ändring',
    back: 'Tillbaka till dokumentet', merge: 'sammanfogning',
    activitiesTitle: 'Aktiviteter i alla mina dokument', overdue: 'Försenade', dueSoon: 'Klara inom 30 dagar', done: 'Klara',
    perOwner: 'Per ansvarig', noOwner: 'Ingen ansvarig angiven', daysLeft: 'dagar kvar', daysLate: 'dagar sen',
    rhythm: 'Styrgruppen möts två gånger om året och det regionala nätverket fyra gånger om året: här är läget inför mötet.',
    empty: 'Inget här.', unprotected: 'Nyckeln har ingen lösenfras (äldre nyckel): skydda den med samverkan-node signer protect.',
    notLoggedIn: 'Inte inloggad: öppna adressen som samverkan-node skrev ut.', error: 'Fel',
    liveNote: 'Sidan uppdateras av sig själv när ändringar kommer.', readOnly: 'Skrivskyddad kopia',
  },
  en: {
    skip: 'Skip to content', docs: 'Documents', activities: 'Activities', language: 'Language', menu: 'Main menu',
    myDocs: 'My documents', title: 'Title', kind: 'Kind', parties: 'Parties', status: 'Status', conflicts: 'Conflicts',
    sync: 'Sync', none: 'None', noDocs: 'No documents yet. Create one below.',
    newDoc: 'New document', create: 'Create', own: '(us)',
    draft: 'draft', awaiting_signatures: 'awaiting signatures', approved: 'approved',
    changed_since_approval: 'changed since approval',
    synced: 'synced', waiting: 'changes waiting', lastSync: 'last synced', never: 'never',
    relayReachable: 'relay reachable', relayUnreachable: 'relay not reachable', yes: 'yes', no: 'no',
    offlineOnly: 'no sync here (samverkan-node ui): local only', notSynced: 'not synced',
    overlaps: 'overlapping edits',
    document: 'The document', fields: 'Details', save: 'Save', saved: 'Saved', saving: 'Saving…',
    periodStart: 'In force from', periodEnd: 'In force until', place: 'Place', date: 'Date', scope: 'Scope',
    goals: 'Goals', addGoal: 'Add goal', goal: 'Goal', remove: 'Remove',
    activity: 'Activity', owners: 'Owners (separate with ;)', due: 'Due (date, quarter 2026-Q2 or ongoing)',
    followupMethod: 'Follow-up method', addActivity: 'Add activity', what: 'What',
    followups: 'Follow-up', addFollowup: 'Add follow-up', text: 'Text', forActivity: 'For activity',
    body: 'Body text', saveBody: 'Save the text',
    bodyHelp: 'The text is saved as a minimal change against the version you started from; concurrent edits by others are kept.',
    conflictsTitle: 'Conflicts to resolve', conflictHelp: 'Concurrent edits left different values. Choose the one to keep.',
    keepThis: 'Keep this', by: 'by', keepMerged: 'Keep the merged text', merged: 'Merged', paragraph: 'paragraph',
    overlapHelp: 'Two people changed the same words at the same time. The texts were merged per character; choose the version to keep.',
    approval: 'Approval', required: 'Required', signedBy: 'Signed by', missing: 'Missing', inForce: 'Version in force',
    pending: 'Awaiting more signatures', withdrawn: 'Withdrawn', awaitingReceipt: "Awaiting the relay's receipt (counts after sync)",
    signer: 'Signer', passphrase: "Key's passphrase", approve: 'Approve the current version', withdraw: 'Withdraw',
    noSigners: 'No signers on this node (samverkan-node signer new).',
    addSignatory: 'Require a signature', org: 'Organisation', role: 'Role (e.g. Landshövding)', name: 'Name',
    signatories: 'Required signatures', diffSigned: 'Show changes since the signed version', noChanges: 'No changes since approval.',
    exportBundle: 'Export and verify the signed bundle', bundleOk: 'The bundle is written and verified:',
    history: 'History', historyOf: 'History of', showVersion: 'Show this version', versionAt: 'Version at change',
    back: 'Back to the document', merge: 'merge',
    activitiesTitle: 'Activities across my documents', overdue: 'Overdue', dueSoon: 'Due within 30 days', done: 'Done',
    perOwner: 'Per owner', noOwner: 'No owner given', daysLeft: 'days left', daysLate: 'days late',
    rhythm: 'The steering group meets twice a year and the regional network four times a year: this is where things stand.',
    empty: 'Nothing here.', unprotected: 'This key has no passphrase (an older key): protect it with samverkan-node signer protect.',
    notLoggedIn: 'Not logged in: open the address samverkan-node printed.', error: 'Error',
    liveNote: 'The page updates itself when changes arrive.', readOnly: 'Read-only copy',
  },
};

const app = { lang: 'sv', session: null, route: null, doc: null, signers: [], refreshing: false, again: false };

function t(key) {
  return (TEXT[app.lang] && TEXT[app.lang][key]) || TEXT.sv[key] || key;
}

// h('tag', {attr: value, onclick: fn}, children…): text is always inserted as text.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && app.session && app.session.csrf) headers['X-CSRF-Token'] = app.session.csrf;
  const r = await fetch(path, { method, headers, credentials: 'same-origin', body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (r.status === 401) { location.replace('/login'); throw new Error(t('notLoggedIn')); }
  if (!r.ok) throw new Error((data && data.error) || r.statusText);
  return data;
}

function flash(message, isError) {
  const el = document.getElementById('flash');
  el.textContent = message;
  el.className = 'flash' + (isError ? ' error' : '');
  el.hidden = !message;
}

function when(iso) {
  if (!iso) return t('never');
  const d = new Date(iso);
  return d.toLocaleString(app.lang === 'sv' ? 'sv-SE' : 'en-GB', { dateStyle: 'short', timeStyle: 'short' });
}

function field(id, label, input, help) {
  input.id = id;
  return h('div', { class: 'field' }, h('label', { for: id }, label), input, help ? h('p', { class: 'help' }, help) : null);
}

// A save's status line; "Saved" stays shown across the redraws a save causes.
// Output of the approval section's tools (diff, signed bundle), per document.
const toolOutput = {};
const savedAt = {};
function statusSpan(id) {
  const el = h('span', { class: 'saved', id, role: 'status' });
  if (savedAt[id] && Date.now() - savedAt[id] < 8000) { el.textContent = t('saved'); el.dataset.saved = '1'; }
  return el;
}

// Runs a save: the button says "Saving…", then "Saved" only once the node answered (committed).
async function saving(button, status, work) {
  button.disabled = true;
  if (status) { status.textContent = t('saving'); status.dataset.saved = ''; if (status.id) delete savedAt[status.id]; }
  try {
    await work();
    if (status) {
      if (status.id) savedAt[status.id] = Date.now();
      status.textContent = t('saved');
      status.dataset.saved = '1';
      const live = status.id && document.getElementById(status.id);
      if (live && live !== status) { live.textContent = t('saved'); live.dataset.saved = '1'; }
    }
    flash('');
    button.disabled = false;
    // Focus leaves the field typed in (so the form may redraw with what was saved) for the button.
    if (button.isConnected) button.focus();
  } catch (e) {
    if (status) status.textContent = '';
    flash(t('error') + ': ' + e.message, true);
  } finally {
    button.disabled = false;
  }
}

// ---- sync bar -------------------------------------------------------------------------------

function drawSync(sync) {
  const el = document.getElementById('sync');
  el.replaceChildren();
  let state;
  const parts = [];
  if (!sync.daemon) {
    state = 'offline';
    parts.push(t('offlineOnly'));
  } else {
    state = sync.waiting > 0 ? 'waiting' : 'synced';
    parts.push(sync.waiting > 0 ? `${t('waiting')}: ${sync.waiting}` : t('synced'));
    parts.push(`${t('lastSync')}: ${when(sync.last_success)}`);
    parts.push(sync.relay_reachable ? t('relayReachable') : t('relayUnreachable'));
    if (!sync.relay_reachable) state = 'unreachable';
  }
  el.dataset.state = state;
  el.dataset.relay = sync.relay_reachable ? 'yes' : 'no';
  el.append(h('span', { class: 'dot ' + state, 'aria-hidden': 'true' }), parts.join(' · '));
}

// ---- start page -----------------------------------------------------------------------------

function approvalBadge(state) {
  return h('span', { class: 'badge ' + (state || 'draft'), dataset: { state: state || '' } }, t(state || 'draft'));
}

async function drawStart(main) {
  const list = await api('GET', '/api/docs');
  drawSync(list.sync);
  const rows = list.docs.map((d) =>
    h('tr', { dataset: { doc: d.id, approval: d.approval || '' } },
      h('td', {}, h('a', { href: `#/doc/${d.id}` }, d.title)),
      h('td', {}, d.kind_label),
      h('td', {}, d.parties.join(', ')),
      h('td', {}, approvalBadge(d.approval)),
      h('td', { class: 'num' }, d.conflicts + d.overlaps > 0
        ? h('span', { class: 'warn' }, `${d.conflicts + d.overlaps}`) : '0'),
      h('td', {}, d.not_synced ? h('span', { class: 'warn', title: d.not_synced }, t('notSynced'))
        : (d.waiting > 0 ? `${t('waiting')}: ${d.waiting}` : (list.sync.daemon ? t('synced') : '–')))));
  const table = list.docs.length === 0 ? h('p', {}, t('noDocs')) : h('div', { class: 'scroll' }, h('table', { id: 'docs' },
    h('caption', { class: 'sr-only' }, t('myDocs')),
    h('thead', {}, h('tr', {}, ['title', 'kind', 'parties', 'status', 'conflicts', 'sync'].map((k) => h('th', { scope: 'col' }, t(k))))),
    h('tbody', {}, rows)));
  const form = newDocForm();
  main.replaceChildren(h('h1', {}, t('myDocs')), h('p', { class: 'help' }, t('liveNote')), table, form);
}

function newDocForm() {
  const s = app.session;
  const kind = h('select', {}, s.kinds.map((k) => h('option', { value: k.id }, k.label)));
  const title = h('input', { type: 'text', required: true, autocomplete: 'off' });
  const parties = h('fieldset', { class: 'parties' }, h('legend', {}, t('parties')),
    s.orgs.map((o) => h('label', { class: 'check' },
      h('input', { type: 'checkbox', value: o.id, id: `new-party-${o.id}`, checked: o.id === s.node.org }),
      ` ${o.name}${o.id === s.node.org ? ' ' + t('own') : ''}`)));
  const button = h('button', { type: 'submit', id: 'new-create' }, t('create'));
  const form = h('form', { id: 'new-doc', class: 'card' }, h('h2', {}, t('newDoc')),
    field('new-kind', t('kind'), kind), field('new-title', t('title'), title), parties, button);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const chosen = Array.from(parties.querySelectorAll('input:checked')).map((i) => i.value);
    saving(button, null, async () => {
      const made = await api('POST', '/api/docs', { kind: kind.value, title: title.value, parties: chosen });
      location.hash = `#/doc/${made.id}`;
    });
  });
  return form;
}

// ---- document page --------------------------------------------------------------------------

function section(id, title, ...content) {
  return h('section', { id, 'aria-labelledby': id + '-h', class: 'card' }, h('h2', { id: id + '-h' }, title), ...content);
}

// A form whose fields the user is typing in is not redrawn under them.
function busy(el) {
  if (!el) return false;
  const a = document.activeElement;
  const typing = a && el.contains(a) && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName);
  return typing || el.dataset.dirty === '1' || !!el.querySelector('[data-dirty="1"]');
}

function markDirty(form) {
  form.addEventListener('input', () => { form.dataset.dirty = '1'; });
}

async function drawDoc(main, id, live) {
  const [doc, signers] = await Promise.all([api('GET', `/api/docs/${id}`), api('GET', '/api/signers')]);
  app.doc = doc;
  app.signers = signers;
  let page = document.getElementById('doc-page');
  if (!live || !page || page.dataset.doc !== doc.id) {
    page = h('div', { id: 'doc-page', dataset: { doc: doc.id } },
      h('div', { id: 'doc-head' }), h('div', { id: 'conflicts' }), h('div', { id: 'rendered' }),
      h('div', { id: 'fields' }), h('div', { id: 'goals' }), h('div', { id: 'activities' }),
      h('div', { id: 'followups' }), h('div', { id: 'body' }), h('div', { id: 'approval' }));
    main.replaceChildren(page);
  }
  const put = (slot, el) => {
    const old = document.getElementById(slot);
    if (busy(old.firstChild)) return;
    const focused = old.contains(document.activeElement) ? document.activeElement.id : '';
    old.replaceChildren(el);
    // Keyboard users keep their place when a section redraws.
    const again = focused && document.getElementById(focused);
    if (again) again.focus({ preventScroll: true });
  };
  put('doc-head', docHead(doc));
  put('conflicts', conflictsView(doc));
  put('rendered', section('doc-rendered', t('document'), h('article', { class: 'markdown', id: 'doc-html' })));
  document.getElementById('doc-html').innerHTML = doc.html; // rendered by the node: raw HTML escaped
  put('fields', fieldsForm(doc));
  put('goals', goalsView(doc));
  put('activities', activitiesView(doc));
  put('followups', followupsView(doc));
  const body = document.getElementById('body');
  const area = document.getElementById('body-text');
  if (!area || area.dataset.dirty !== '1') body.replaceChildren(bodyForm(doc));
  put('approval', approvalView(doc));
}

function docHead(doc) {
  const v = doc.view;
  return h('header', { class: 'doc-head' },
    h('h1', { id: 'doc-title' }, v.title),
    h('p', { class: 'meta' }, `${doc.kind_label} · ${doc.scope_label} · ${doc.parties.join(', ')} · `,
      h('span', { id: 'doc-status' }, approvalBadge(doc.approval.state))),
    doc.sync_problem ? h('p', { class: 'note warn' }, doc.sync_problem) : null,
    doc.writable ? null : h('p', { class: 'note warn' }, t('readOnly')),
    h('p', {}, h('a', { href: `#/doc/${doc.id}/history`, id: 'history-link' }, t('history'))));
}

function conflictsView(doc) {
  if (doc.conflicts.length === 0 && doc.overlaps.length === 0) return h('div', {});
  const items = [];
  for (const c of doc.conflicts) {
    items.push(h('div', { class: 'conflict', dataset: { path: c.path } }, h('h3', {}, c.path),
      h('div', { class: 'sides' }, c.values.map((v) => {
        const b = h('button', { type: 'button', class: 'keep' }, t('keepThis'));
        b.addEventListener('click', () => saving(b, null, () =>
          api('POST', `/api/docs/${doc.id}/conflicts`, { path: c.path, value: v.value })).then(refresh));
        return h('div', { class: 'side' }, h('p', { class: 'value' }, v.value), h('p', { class: 'by' }, `${t('by')} ${v.by}`), b);
      }))));
  }
  for (const o of doc.overlaps) {
    const take = (which) => {
      const b = h('button', { type: 'button', class: 'keep' }, which === 'merged' ? t('keepMerged') : t('keepThis'));
      b.addEventListener('click', () => saving(b, null, () =>
        api('POST', `/api/docs/${doc.id}/review`, { n: o.n, take: which })).then(refresh));
      return b;
    };
    items.push(h('div', { class: 'conflict overlap', dataset: { overlap: o.key } },
      h('h3', {}, `${o.label}, ${t('paragraph')} ${o.paragraph}`), h('p', { class: 'help' }, t('overlapHelp')),
      h('div', { class: 'sides' }, o.sides.map((s, i) => h('div', { class: 'side' },
        h('p', { class: 'value' }, s.text), h('p', { class: 'by' }, `${t('by')} ${s.by}, ${when(s.time)}`),
        take(i === 0 ? 'first' : 'second')))),
      h('div', { class: 'merged' }, h('p', {}, h('strong', {}, t('merged') + ': '), o.merged), take('merged'))));
  }
  return section('doc-conflicts', t('conflictsTitle'), h('p', { class: 'help' }, t('conflictHelp')), items);
}

function fieldsForm(doc) {
  const v = doc.view;
  const inputs = {
    title: h('input', { type: 'text', value: v.title }),
    'period.start': h('input', { type: 'date', value: v.period.start || '' }),
    'period.end': h('input', { type: 'date', value: v.period.end || '' }),
    place: h('input', { type: 'text', value: v.place || '' }),
    date: h('input', { type: 'date', value: v.date || '' }),
  };
  const original = Object.fromEntries(Object.entries(inputs).map(([k, i]) => [k, i.value]));
  const status = statusSpan('fields-saved');
  const button = h('button', { type: 'submit', id: 'fields-save' }, t('save'));
  const labels = { title: t('title'), 'period.start': t('periodStart'), 'period.end': t('periodEnd'), place: t('place'), date: t('date') };
  const form = h('form', { id: 'fields-form' },
    h('div', { class: 'grid' }, Object.entries(inputs).map(([k, i]) => field('f-' + k.replace('.', '-'), labels[k], i))),
    button, ' ', status);
  markDirty(form);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    saving(button, status, async () => {
      for (const [k, i] of Object.entries(inputs)) {
        if (i.value !== original[k]) await api('POST', `/api/docs/${doc.id}/set`, { field: k, value: i.value });
      }
      form.dataset.dirty = '';
    });
  });
  return section('doc-fields', t('fields'), form);
}

function removeButton(doc, list, item, label) {
  const b = h('button', { type: 'button', class: 'secondary', 'aria-label': `${t('remove')}: ${label}` }, t('remove'));
  b.addEventListener('click', () => saving(b, null, () => api('POST', `/api/docs/${doc.id}/remove`, { list, item })).then(refresh));
  return b;
}

function goalsView(doc) {
  const items = doc.view.goals.map((g) => h('li', {}, g.text, ' ', removeButton(doc, 'goals', g.id, g.text)));
  const text = h('input', { type: 'text', required: true });
  const button = h('button', { type: 'submit' }, t('addGoal'));
  const form = h('form', { class: 'inline' }, field('goal-new', t('goal'), text), button);
  markDirty(form);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    saving(button, null, () => api('POST', `/api/docs/${doc.id}/goals`, { text: text.value })).then(() => { form.dataset.dirty = ''; refresh(); });
  });
  return section('doc-goals', t('goals'), items.length ? h('ul', {}, items) : h('p', {}, t('empty')), form);
}

function statusSelect(value) {
  return h('select', {}, app.session.statuses.map((s) => h('option', { value: s.id, selected: s.id === value }, s.label)));
}

function activityForm(doc, a) {
  const key = a ? a.id : 'new';
  const inputs = {
    what: h('input', { type: 'text', value: a ? a.what : '', required: true }),
    owners: h('input', { type: 'text', value: a ? a.owners : '' }),
    due: h('input', { type: 'text', value: a ? (a.due || '') : '' }),
    followup_method: h('input', { type: 'text', value: a ? (a.followup_method || '') : '' }),
    status: statusSelect(a ? a.status : 'planned'),
  };
  const labels = { what: t('what'), owners: t('owners'), due: t('due'), followup_method: t('followupMethod'), status: t('status') };
  const status = h('span', { class: 'saved', role: 'status' });
  const button = h('button', { type: 'submit' }, a ? t('save') : t('addActivity'));
  const form = h('form', { class: 'activity', dataset: { activity: key } },
    h('div', { class: 'grid' }, Object.entries(inputs).map(([k, i]) => field(`a-${key}-${k}`, labels[k], i))),
    button, ' ', a ? removeButton(doc, 'activities', a.id, a.what) : null, ' ', status);
  markDirty(form);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const body = {};
    for (const [k, i] of Object.entries(inputs)) body[k] = i.value;
    if (a) {
      // Only what changed is written (a field set always writes: it would override concurrent edits).
      const old = { what: a.what, owners: a.owners, due: a.due || '', followup_method: a.followup_method || '', status: a.status };
      for (const k of Object.keys(body)) if (body[k] === old[k]) delete body[k];
    }
    saving(button, status, () => api('POST', a ? `/api/docs/${doc.id}/activities/${a.id}` : `/api/docs/${doc.id}/activities`, body))
      .then(() => { form.dataset.dirty = ''; refresh(); });
  });
  return form;
}

function activitiesView(doc) {
  return section('doc-activities', t('activities'),
    doc.activities.map((a) => h('div', { class: 'item' }, h('h3', {}, a.what), activityForm(doc, a))),
    h('h3', {}, t('addActivity')), activityForm(doc, null));
}

function followupsView(doc) {
  const items = doc.view.followups.map((f) => h('li', {}, `${f.date} · ${f.author}: ${f.text}`));
  const text = h('textarea', { rows: 2, required: true });
  const activity = h('select', {}, h('option', { value: '' }, '–'), doc.activities.map((a) => h('option', { value: a.id }, a.what)));
  const button = h('button', { type: 'submit' }, t('addFollowup'));
  const form = h('form', {}, field('followup-text', t('text'), text), field('followup-activity', t('forActivity'), activity), button);
  markDirty(form);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    saving(button, null, () => api('POST', `/api/docs/${doc.id}/followups`, { text: text.value, activity: activity.value || null }))
      .then(() => { form.dataset.dirty = ''; refresh(); });
  });
  return section('doc-followups', t('followups'), items.length ? h('ul', {}, items) : h('p', {}, t('empty')), form);
}

function bodyForm(doc) {
  const area = h('textarea', { rows: 16, spellcheck: 'true', dataset: { base: doc.heads.join(',') } });
  area.value = doc.body;
  area.addEventListener('input', () => { area.dataset.dirty = '1'; });
  const status = statusSpan('body-saved');
  const button = h('button', { type: 'submit', id: 'body-save' }, t('saveBody'));
  const form = h('form', { id: 'body-form' }, field('body-text', t('body'), area, t('bodyHelp')), button, ' ', status);
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    saving(button, status, async () => {
      await api('POST', `/api/docs/${doc.id}/body`, { base: area.dataset.base.split(',').filter(Boolean), body: area.value });
      area.dataset.dirty = '';
    }).then(refresh);
  });
  return section('doc-body', t('body'), form);
}

function signedList(version) {
  return h('ul', {}, version.signed.map((s) => h('li', { class: 'signed' }, `${s.name}, ${s.role} · ${when(s.signed_at)}`)),
    version.missing.map((m) => h('li', { class: 'missing' }, `${t('missing')}: ${m.role}${m.name ? ', ' + m.name : ''}`)));
}

function approvalView(doc) {
  const a = doc.approval;
  const st = a.status;
  const parts = [h('p', {}, `${t('status')}: `, h('span', { id: 'approval-state' }, approvalBadge(a.state)))];
  parts.push(h('h3', {}, t('signatories')));
  parts.push(doc.signatories.length
    ? h('ul', {}, doc.signatories.map((s, i) => h('li', {}, `${s.role} (${s.org_name})${s.name ? ', ' + s.name : ''} `,
      removeButton(doc, 'signatories', String(i + 1), s.role))))
    : h('p', {}, t('empty')));
  if (st.in_force) parts.push(h('h3', {}, t('inForce')), signedList(st.in_force));
  if (st.pending) parts.push(h('h3', {}, t('pending')), signedList(st.pending));
  if (st.withdrawn.length) parts.push(h('h3', {}, t('withdrawn')), h('ul', {}, st.withdrawn.map((w) => h('li', {}, `${w.name}, ${w.role}`))));
  if (a.awaiting.length) parts.push(h('p', { class: 'note' }, `${t('awaitingReceipt')}: `, a.awaiting.map((w) => `${w.signer} (${w.role})`).join(', ')));

  // Require a signature.
  const org = h('select', {}, app.session.orgs.map((o) => h('option', { value: o.id }, o.name)));
  const role = h('input', { type: 'text', required: true });
  const name = h('input', { type: 'text' });
  const add = h('button', { type: 'submit' }, t('addSignatory'));
  const sigForm = h('form', { id: 'signatory-form', class: 'inline' }, field('sig-org', t('org'), org), field('sig-role', t('role'), role),
    field('sig-name', t('name'), name), add);
  markDirty(sigForm);
  sigForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    saving(add, null, () => api('POST', `/api/docs/${doc.id}/signatories`, { org: org.value, role: role.value, name: name.value }))
      .then(() => { sigForm.dataset.dirty = ''; refresh(); });
  });
  parts.push(sigForm);

  // Sign or withdraw.
  if (app.signers.length === 0) {
    parts.push(h('p', {}, t('noSigners')));
  } else {
    const signer = h('select', {}, app.signers.map((s) => h('option', { value: s.name }, `${s.name} – ${s.role} (${s.org_name})`)));
    const pass = h('input', { type: 'password', autocomplete: 'off' });
    const status = statusSpan('approve-saved');
    const approve = h('button', { type: 'submit', id: 'approve-button' }, t('approve'));
    const withdraw = h('button', { type: 'button', id: 'withdraw-button', class: 'secondary' }, t('withdraw'));
    const form = h('form', { id: 'approve-form' }, field('approve-signer', t('signer'), signer),
      field('approve-passphrase', t('passphrase'), pass), approve, ' ', withdraw, ' ', status);
    markDirty(form);
    const send = (button, isWithdraw) => saving(button, status, async () => {
      const done = await api('POST', `/api/docs/${doc.id}/approve`, { signer: signer.value, passphrase: pass.value, withdraw: isWithdraw });
      pass.value = '';
      form.dataset.dirty = '';
      if (done.unprotected_key) flash(t('unprotected'), false);
    }).then(() => { pass.value = ''; refresh(); });
    form.addEventListener('submit', (ev) => { ev.preventDefault(); send(approve, false); });
    withdraw.addEventListener('click', () => send(withdraw, true));
    parts.push(form);
  }

  // Diff against the signed version; export and verify the signed bundle.
  if (st.in_force) {
    // What the two tools showed is kept per document: a live update may redraw this
    // section while (or after) a request runs, and the answer must land on the page.
    const out = h('div', { id: 'approval-out' });
    const show = (nodes) => {
      toolOutput[doc.id] = nodes;
      (document.getElementById('approval-out') || out).replaceChildren(...nodes);
    };
    if (toolOutput[doc.id]) out.replaceChildren(...toolOutput[doc.id].map((n) => n.cloneNode(true)));
    const diff = h('button', { type: 'button', class: 'secondary', id: 'diff-button' }, t('diffSigned'));
    diff.addEventListener('click', () => saving(diff, null, async () => {
      const d = await api('GET', `/api/docs/${doc.id}/diff`);
      show([d.changed ? h('pre', { class: 'diff' }, d.diff) : h('p', {}, t('noChanges'))]);
    }));
    const bundle = h('button', { type: 'button', class: 'secondary', id: 'bundle-button' }, t('exportBundle'));
    bundle.addEventListener('click', () => saving(bundle, null, async () => {
      const b = await api('POST', `/api/docs/${doc.id}/signed-bundle`);
      show([h('p', {}, `${t('bundleOk')} ${b.dir}`),
        h('ul', {}, b.report.signed.map((s) => h('li', {}, `${s.name}, ${s.role} · ${when(s.signed_at)}`)))]);
    }));
    parts.push(h('p', {}, diff, ' ', bundle), out);
  }
  return section('doc-approval', t('approval'), ...parts);
}

// ---- history --------------------------------------------------------------------------------

async function drawHistory(main, id) {
  const [doc, lines] = await Promise.all([api('GET', `/api/docs/${id}`), api('GET', `/api/docs/${id}/history`)]);
  const view = h('div', { id: 'version-view' });
  const items = lines.slice().reverse().map((c) => {
    const b = h('button', { type: 'button', class: 'secondary' }, t('showVersion'));
    b.addEventListener('click', () => saving(b, null, async () => {
      const v = await api('GET', `/api/docs/${id}/version?heads=${c.hash}`);
      const article = h('article', { class: 'markdown', id: 'version-html' });
      article.innerHTML = v.html;
      view.replaceChildren(section('version', `${t('versionAt')} ${c.hash.slice(0, 8)}: ${v.view.title}`, article));
      view.scrollIntoView();
    }));
    return h('li', { class: 'change', dataset: { hash: c.hash } },
      h('p', { class: 'when' }, h('time', { datetime: c.time || '' }, when(c.time)), ' · ', h('strong', {}, c.by)),
      c.message ? h('p', { class: 'message' }, c.message) : null,
      h('ul', {}, c.changes.map((f) => h('li', {}, f.text))),
      c.merged && c.merged.length ? h('p', { class: 'help' }, t('merge')) : null,
      b);
  });
  main.replaceChildren(h('h1', {}, `${t('historyOf')} ${doc.view.title}`),
    h('p', {}, h('a', { href: `#/doc/${id}` }, t('back'))),
    h('ol', { class: 'timeline', id: 'timeline' }, items), view);
}

// ---- activities across documents ------------------------------------------------------------

async function drawActivities(main) {
  const data = await api('GET', '/api/activities');
  const open = (a) => a.status !== 'done' && a.status !== 'cancelled';
  const row = (a) => h('li', { dataset: { activity: a.id } },
    h('a', { href: `#/doc/${a.doc}` }, a.what), ` · ${a.doc_title} · `,
    a.owners.length ? a.owners.join(', ') : t('noOwner'),
    a.due_label ? ` · ${a.due_label}` : '',
    a.days_left !== null && open(a) ? (a.days_left < 0 ? ` (${-a.days_left} ${t('daysLate')})` : ` (${a.days_left} ${t('daysLeft')})`) : '',
    ` · ${a.status_label}`);
  const group = (id, title, items) => section(id, `${title} (${items.length})`,
    items.length ? h('ul', {}, items.map(row)) : h('p', {}, t('empty')));
  const overdue = data.activities.filter((a) => open(a) && a.days_left !== null && a.days_left < 0);
  const soon = data.activities.filter((a) => open(a) && a.days_left !== null && a.days_left >= 0 && a.days_left <= 30);
  const done = data.activities.filter((a) => a.status === 'done');
  const owners = new Map();
  for (const a of data.activities.filter(open)) {
    for (const o of (a.owners.length ? a.owners : [t('noOwner')])) {
      if (!owners.has(o)) owners.set(o, []);
      owners.get(o).push(a);
    }
  }
  const perOwner = section('act-owners', t('perOwner'), owners.size === 0 ? h('p', {}, t('empty'))
    : Array.from(owners.entries()).sort().map(([o, list]) => h('div', {}, h('h3', {}, `${o} (${list.length})`), h('ul', {}, list.map(row)))));
  main.replaceChildren(h('h1', {}, t('activitiesTitle')), h('p', { class: 'help' }, t('rhythm')),
    group('act-overdue', t('overdue'), overdue), group('act-soon', t('dueSoon'), soon), group('act-done', t('done'), done), perOwner);
}

// ---- routing, live updates ------------------------------------------------------------------

function translateChrome() {
  document.documentElement.lang = app.lang;
  document.getElementById('skip').textContent = t('skip');
  document.getElementById('nav-docs').textContent = t('docs');
  document.getElementById('nav-activities').textContent = t('activities');
  document.getElementById('lang-label').textContent = t('language');
  document.getElementById('nav').setAttribute('aria-label', t('menu'));
  document.getElementById('lang').value = app.lang;
}

async function draw(live) {
  const main = document.getElementById('main');
  const hash = location.hash || '#/';
  const m = hash.match(/^#\/doc\/([0-9a-f]+)(\/history)?$/);
  try {
    if (!live || !hash.startsWith('#/doc/')) {
      const list = await api('GET', '/api/docs');
      drawSync(list.sync);
    }
    if (m && m[2]) await drawHistory(main, m[1]);
    else if (m) await drawDoc(main, m[1], live);
    else if (hash === '#/activities') await drawActivities(main);
    else await drawStart(main);
    if (!live) { document.title = 'Samverkan'; main.focus({ preventScroll: true }); }
  } catch (e) {
    flash(`${t('error')}: ${e.message}`, true);
  }
}

// Redraws the current view (one at a time; a change during a redraw redraws once more).
async function refresh() {
  if (app.refreshing) { app.again = true; return; }
  app.refreshing = true;
  try {
    const list = await api('GET', '/api/docs');
    drawSync(list.sync);
    const hash = location.hash || '#/';
    if (!hash.endsWith('/history')) await draw(true);
  } catch (e) {
    flash(`${t('error')}: ${e.message}`, true);
  } finally {
    app.refreshing = false;
    if (app.again) { app.again = false; refresh(); }
  }
}

async function start() {
  app.lang = localStorage.getItem('samverkan.lang') || 'sv';
  try {
    app.session = await api('GET', '/api/session');
  } catch (e) {
    flash(e.message, true);
    return;
  }
  const s = app.session.node;
  document.getElementById('whoami').textContent = `· ${s.name} (${s.org_name})`;
  translateChrome();
  document.getElementById('lang').addEventListener('change', (ev) => {
    app.lang = ev.target.value;
    localStorage.setItem('samverkan.lang', app.lang);
    translateChrome();
    draw(false);
  });
  window.addEventListener('hashchange', () => { flash(''); draw(false); });
  const events = new EventSource('/api/events');
  let timer = null;
  events.addEventListener('change', () => {
    clearTimeout(timer);
    timer = setTimeout(refresh, 80);
  });
  await draw(false);
  document.body.dataset.ready = '1';
}

start();
