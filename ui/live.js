// live.js: GoodJob-style "live poll". Every few seconds it fetches the page again and
// swaps in the fresh copies of the parts marked data-live. The page works without it.
(function () {
  "use strict";
  var every = 5000;
  function poll() {
    fetch(location.href, { credentials: "same-origin" })
      .then(function (res) {
        if (!res.ok || res.redirected) { throw new Error("stale session"); }
        return res.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh) { el.replaceWith(fresh); }
        });
        setTimeout(poll, every);
      })
      .catch(function () { setTimeout(poll, every * 4); });
  }
  setTimeout(poll, every);
})();
