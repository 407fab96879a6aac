// Hands the secret from the URL fragment (never sent to a server) to the web
// app once, which answers with a session cookie; then opens the app.
(function () {
  'use strict';
  var status = document.getElementById('login-status');
  var help = document.getElementById('login-help');
  var secret = decodeURIComponent((location.hash || '').replace(/^#/, '')).trim();
  history.replaceState(null, '', '/login');
  if (!secret) {
    status.textContent = 'Inte inloggad.';
    help.hidden = false;
    return;
  }
  fetch('/api/login', { method: 'POST', headers: { 'X-API-Key': secret }, credentials: 'same-origin' })
    .then(function (r) {
      if (!r.ok) { throw new Error('refused'); }
      location.replace('/');
    })
    .catch(function () {
      status.textContent = 'Fel hemlighet: inloggningen nekades.';
      help.hidden = false;
    });
})();
