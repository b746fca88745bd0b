/* Sluice console: a little plain JavaScript, nothing required to use the pages.
 * - [data-live]: refresh the dashboard's figures by fetching the same tables again (GET, same session)
 *   and updating only the cells that changed, so focus and scroll stay where they are.
 * - [data-select-all]: a checkbox that ticks every checkbox of that name.
 */
(function () {
  "use strict";

  function liveRefresh(box) {
    var url = box.getAttribute("data-live");
    var every = parseInt(box.getAttribute("data-interval"), 10) || 2000;
    var status = document.getElementById("live-status");
    var busy = false;
    var timer = null;

    function say(text) { if (status) { status.textContent = text; } }

    function apply(html) {
      var doc = new DOMParser().parseFromString(html, "text/html");
      var fresh = {};
      doc.querySelectorAll("[data-k]").forEach(function (el) { fresh[el.getAttribute("data-k")] = el; });
      var here = box.querySelectorAll("[data-k]");
      var same = here.length === Object.keys(fresh).length;
      here.forEach(function (el) { if (!fresh[el.getAttribute("data-k")]) { same = false; } });
      if (!same) { box.innerHTML = doc.body.innerHTML; return; }  // channels changed: redraw all
      here.forEach(function (el) {
        var src = fresh[el.getAttribute("data-k")];
        if (el.innerHTML !== src.innerHTML) { el.innerHTML = src.innerHTML; }
        if (el.className !== src.className) { el.className = src.className; }
        var t = src.getAttribute("title");
        if (t !== null && el.getAttribute("title") !== t) { el.setAttribute("title", t); }
      });
    }

    function tick() {
      if (busy || document.hidden) { return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" }, cache: "no-store" })
        .then(function (r) {
          if (r.status === 401) {
            clearInterval(timer);
            say("Your session ended: reload the page to log in again.");
            return null;
          }
          if (!r.ok) { throw new Error("HTTP " + r.status); }
          return r.text();
        })
        .then(function (html) {
          if (html === null) { return; }
          apply(html);
          say("Updated " + new Date().toLocaleTimeString() + " (every " + Math.round(every / 1000) + " s)");
          box.setAttribute("data-refreshed", String((parseInt(box.getAttribute("data-refreshed"), 10) || 0) + 1));
        })
        .catch(function (e) { say("Cannot refresh (" + e.message + "); trying again."); })
        .then(function () { busy = false; });
    }

    timer = setInterval(tick, every);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) { tick(); } });
  }

  function selectAll(box) {
    var name = box.getAttribute("data-select-all");
    var form = box.form || document;
    box.addEventListener("change", function () {
      form.querySelectorAll('input[type=checkbox][name="' + name + '"]').forEach(function (c) {
        c.checked = box.checked;
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(liveRefresh);
    document.querySelectorAll("[data-select-all]").forEach(selectAll);
  });
})();
