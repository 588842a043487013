// Config editor: a diagnostic's location link puts the cursor on (and selects) that line of the
// textarea; the cursor's line and column are shown under it. No inline script (strict CSP).
(function () {
  "use strict";

  function editor() {
    return document.getElementById("editor");
  }

  function selectLine(line) {
    var ta = editor();
    if (!ta || !(line > 0)) return;
    var lines = ta.value.split("\n");
    var start = 0;
    for (var i = 0; i < line - 1 && i < lines.length; i++) start += lines[i].length + 1;
    var end = start + (lines[line - 1] || "").length;
    ta.focus();
    ta.setSelectionRange(start, end);
    var lineHeight = parseFloat(getComputedStyle(ta).lineHeight) || 18;
    ta.scrollTop = Math.max(0, (line - 4) * lineHeight);
    showPosition();
  }

  function showPosition() {
    var ta = editor();
    var out = document.getElementById("cursor-pos");
    if (!ta || !out) return;
    var before = ta.value.slice(0, ta.selectionStart).split("\n");
    out.textContent = "Line " + before.length + ", column " + (before[before.length - 1].length + 1);
  }

  document.addEventListener("click", function (ev) {
    var link = ev.target.closest && ev.target.closest("a.cfg-goto");
    if (!link) return;
    ev.preventDefault();
    selectLine(parseInt(link.getAttribute("data-line"), 10));
  });

  document.addEventListener("DOMContentLoaded", function () {
    var ta = editor();
    if (!ta) return;
    ["keyup", "click", "select"].forEach(function (name) {
      ta.addEventListener(name, showPosition);
    });
    // An edit makes an earlier review stale: the Save button goes with it.
    ta.addEventListener("input", function () {
      var pane = document.getElementById("review-pane");
      if (pane && pane.firstChild) pane.textContent = "";
    });
  });
})();
