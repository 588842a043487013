// Submitting a workflow (/ui/workflows/new): a chosen file is read here into the textarea (its
// format from its extension), so the form posts it as text with its CSRF token; a problem's
// line link selects that line in the textarea.
(function () {
  "use strict";
  const FORMATS = { ncl: "ncl", json: "json", yaml: "yaml", yml: "yaml" };

  function selectLine(area, line) {
    const lines = area.value.split("\n");
    let start = 0;
    for (let i = 0; i < line - 1 && i < lines.length; i += 1) start += lines[i].length + 1;
    const end = start + (lines[line - 1] || "").length;
    area.focus();
    area.setSelectionRange(start, end);
    const height = area.scrollHeight / Math.max(lines.length, 1);
    area.scrollTop = Math.max(0, (line - 3) * height);
  }

  function init() {
    const file = document.getElementById("submit-file");
    const area = document.getElementById("submit-text");
    if (!file || !area) return;
    const format = document.getElementById("submit-format");
    const name = document.getElementById("submit-filename");
    const note = document.getElementById("submit-file-note");
    file.addEventListener("change", function () {
      const chosen = file.files && file.files[0];
      if (!chosen) return;
      const reader = new FileReader();
      reader.addEventListener("load", function () {
        area.value = String(reader.result);
        const ext = chosen.name.split(".").pop().toLowerCase();
        if (FORMATS[ext]) format.value = FORMATS[ext];
        name.value = chosen.name;
        note.textContent = "read from " + chosen.name;
      });
      reader.addEventListener("error", function () {
        note.textContent = "could not read " + chosen.name;
      });
      reader.readAsText(chosen);
    });
    area.addEventListener("input", function () {
      if (name.value) {
        name.value = "";
        note.textContent = "";
      }
    });
    document.querySelectorAll(".submit-goto").forEach(function (link) {
      link.addEventListener("click", function (event) {
        event.preventDefault();
        selectLine(area, Number(link.dataset.line));
      });
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
