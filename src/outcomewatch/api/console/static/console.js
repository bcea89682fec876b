// The console's only script (CSP: script-src 'self'). It renders times relative to now, counts
// down open runs, refreshes the incident list, and calls the incident actions of the API.
// Everything from the server is already escaped HTML; this file only sets textContent.
"use strict";
(function () {
  var TOKEN_KEY = "outcomewatch.token";  // sessionStorage: forgotten when the browser closes
  var ACTOR_KEY = "outcomewatch.actor";

  function ago(ms) {
    var s = Math.round(Math.abs(ms) / 1000);
    var text;
    if (s < 45) text = s + " s";
    else if (s < 90 * 60) text = Math.round(s / 60) + " min";
    else if (s < 36 * 3600) text = Math.round(s / 3600) + " h";
    else text = Math.round(s / 86400) + " d";
    return ms >= 0 ? text + " ago" : "in " + text;
  }

  function renderTimes(root) {
    var now = Date.now();
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("datetime"));
      if (isNaN(at)) return;
      if (el.classList.contains("countdown")) {
        var left = at - now;
        el.textContent = left > 0 ? "due " + ago(-left) : "due now";
        el.classList.toggle("overdue", left <= 0);
      } else {
        el.textContent = ago(now - at);
      }
    });
  }

  function refreshLive() {
    var live = document.getElementById("live");
    if (!live) return;
    var seconds = parseInt(live.dataset.refresh || "0", 10);
    if (!seconds) return;
    setInterval(function () {
      if (document.hidden) return;
      fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          ["live", "count-open", "count-risk", "count-judged"].forEach(function (id) {
            var fresh = doc.getElementById(id), old = document.getElementById(id);
            if (fresh && old) old.replaceWith(document.importNode(fresh, true));
          });
          renderTimes(document);
        })
        .catch(function () { /* keep the last good list; the next tick retries */ });
    }, seconds * 1000);
  }

  function setupActions() {
    var article = document.querySelector("article.incident[data-incident]");
    if (!article) return;
    var id = article.dataset.incident;
    var result = document.getElementById("action-result");
    var tokenBox = document.querySelector(".token-box");
    var tokenInput = document.getElementById("token");
    var actor = document.getElementById("actor");
    actor.value = sessionStorage.getItem(ACTOR_KEY) || "";
    if (document.body.dataset.writesNeedToken === "true" && !sessionStorage.getItem(TOKEN_KEY)) {
      tokenBox.hidden = false;
    }
    document.querySelectorAll("button.act").forEach(function (button) {
      button.addEventListener("click", function () {
        if (tokenInput.value) sessionStorage.setItem(TOKEN_KEY, tokenInput.value);
        if (actor.value) sessionStorage.setItem(ACTOR_KEY, actor.value);
        var body = {};
        var comment = document.getElementById("comment").value.trim();
        if (comment) body.comment = comment;
        if (actor.value.trim()) body.actor = actor.value.trim();
        var headers = { "Content-Type": "application/json" };
        var token = sessionStorage.getItem(TOKEN_KEY);
        if (token) headers.Authorization = "Bearer " + token;
        result.textContent = "…";
        fetch("/api/v1/incidents/" + id + "/" + button.dataset.action, {
          method: "POST", headers: headers, body: JSON.stringify(body), credentials: "omit",
        }).then(function (r) {
          if (r.ok) { location.reload(); return; }
          if (r.status === 401 || r.status === 403) {
            sessionStorage.removeItem(TOKEN_KEY);
            tokenBox.hidden = false;
            tokenInput.focus();
          }
          return r.json().then(function (b) {
            result.textContent = r.status + ": " + (typeof b.detail === "string" ? b.detail : JSON.stringify(b.detail));
          }, function () { result.textContent = "HTTP " + r.status; });
        }, function () { result.textContent = "the server did not answer"; });
      });
    });
  }

  function setupLogin() {
    var form = document.getElementById("login");
    if (!form) return;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var token = document.getElementById("login-token").value;
      var secure = location.protocol === "https:" ? "; Secure" : "";
      // A session cookie (no expiry): pages are plain links, so the token travels as a cookie.
      document.cookie = "outcomewatch_token=" + encodeURIComponent(token) +
        "; path=/; SameSite=Strict" + secure;
      location.reload();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    renderTimes(document);
    setInterval(function () { renderTimes(document); }, 1000);
    refreshLive();
    setupActions();
    setupLogin();
  });
})();
