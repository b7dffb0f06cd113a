// flash.js: the message an action's redirect announced (?flash=) is shown once. The
// address loses its flash parameters, so a reload, a bookmark or a copied link does not
// say again that the run was canceled.
(function () {
  "use strict";
  var url = new URL(location.href);
  url.searchParams.delete("flash");
  url.searchParams.delete("n");
  history.replaceState(history.state, "", url.pathname + url.search + url.hash);
})();
