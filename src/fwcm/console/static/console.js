// fwcm console: the little the pages need JavaScript for. Without it they read the same and
// their actions ask for confirmation on a page of their own.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // Actions: confirm() here, so the server skips its confirmation page.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.confirm(form.dataset.confirm)) { ev.preventDefault(); return; }
      form.querySelector("input[name=confirmed]").value = "yes";
    });
  });
  // Live part of a campaign page: replaced by each fragment the server sends (only on a change).
  var live = document.querySelector("[data-live]");
  if (live && window.EventSource) {
    var source = new EventSource(live.dataset.live);
    source.addEventListener("stats", function (ev) {
      live.innerHTML = ev.data;
      live.dataset.updates = String(Number(live.dataset.updates || 0) + 1);
      var state = live.querySelector("#campaign-state");
      if (state && document.body.dataset.state && document.body.dataset.state !== state.textContent) {
        window.location.reload();  // the actions on offer depend on the state
      }
    });
    source.addEventListener("signedout", function () { source.close(); window.location.assign("/ui/signin"); });
  }
});
