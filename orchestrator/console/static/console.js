// The saga console's progressive enhancement: times in the viewer's time zone (UTC on
// hover), and live pages updated from Server-Sent Events. The pages work without it.
(function () {
  "use strict";

  function pad(n) { return String(n).padStart(2, "0"); }

  function localText(moment, precise) {
    var text = moment.getFullYear() + "-" + pad(moment.getMonth() + 1) + "-" +
      pad(moment.getDate()) + " " + pad(moment.getHours()) + ":" + pad(moment.getMinutes()) +
      ":" + pad(moment.getSeconds());
    return precise ? text + "." + String(moment.getMilliseconds()).padStart(3, "0") : text;
  }

  // Each <time datetime> was written in UTC, which its title keeps; it now reads local time.
  function localize(root) {
    root.querySelectorAll("time[datetime]").forEach(function (element) {
      var moment = new Date(element.getAttribute("datetime"));
      if (isNaN(moment.getTime())) { return; }
      element.textContent = localText(moment, element.hasAttribute("data-precise"));
      element.setAttribute("data-local", "");
    });
  }

  function describeZone() {
    var zone = "";
    try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { zone = ""; }
    document.querySelectorAll("[data-zone]").forEach(function (element) {
      element.textContent = "Times are in your time zone" + (zone ? " (" + zone + ")" : "") +
        "; hover over one for UTC.";
    });
  }

  // Where the focus was inside a live region, so that an update does not take it away.
  function focusKey(box) {
    var active = document.activeElement;
    if (!active || !box.contains(active)) { return null; }
    return active.getAttribute("href") || active.id || null;
  }

  function refocus(box, key) {
    if (!key) { return; }
    var found = Array.prototype.find.call(box.querySelectorAll("a[href], [id]"), function (el) {
      return el.getAttribute("href") === key || el.id === key;
    });
    if (found) { found.focus(); }
  }

  function follow(box) {
    var status = document.querySelector("[data-live-status]");
    var source = new EventSource(box.getAttribute("data-live-url"));
    function say(text) { if (status) { status.textContent = text; } }
    box.setAttribute("data-live", "connecting");
    source.addEventListener("open", function () {
      box.setAttribute("data-live", "open");
      say("Live: this page follows changes as they happen.");
    });
    source.addEventListener("update", function (event) {
      var key = focusKey(box);
      box.innerHTML = event.data;
      localize(box);
      refocus(box, key);
      box.setAttribute("data-updated", String(Date.now()));
    });
    source.addEventListener("end", function () {
      source.close();
      box.setAttribute("data-live", "ended");
      say("The saga has ended: nothing more will change on its own.");
    });
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {
        box.setAttribute("data-live", "closed");
        say("Live updates stopped: reload the page.");
      } else {
        box.setAttribute("data-live", "reconnecting");
        say("Live updates paused: reconnecting…");
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localize(document);
    describeZone();
    document.querySelectorAll("[data-live-url]").forEach(follow);
  });
})();
