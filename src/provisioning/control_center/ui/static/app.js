// The UI's own script (loaded in <head>, before htmx). The Content-Security-Policy allows no
// inline script, so everything dynamic that is not htmx lives here.
(function () {
  "use strict";
  var root = document.documentElement;
  var KEY = "prvng-theme";
  var THEMES = ["system", "light", "dark"];

  function storedTheme() {
    try {
      var t = window.localStorage.getItem(KEY);
      return THEMES.indexOf(t) >= 0 ? t : "system";
    } catch (e) {
      return "system";
    }
  }

  function applyTheme(theme) {
    if (theme === "system") {
      root.removeAttribute("data-theme");
    } else {
      root.setAttribute("data-theme", theme);
    }
    var label = document.querySelector("#theme-toggle .theme-label");
    if (label) {
      label.textContent = theme === "system" ? "Theme: system" : "Theme: " + theme;
    }
  }

  // Before the first paint: no flash of the wrong theme.
  applyTheme(storedTheme());

  // htmx sends the session's CSRF token with every request it makes (hx-headers on <html>,
  // inherited by every element); plain forms carry it in a hidden field.
  var meta = document.querySelector('meta[name="csrf-token"]');
  if (meta && meta.content) {
    root.setAttribute("hx-headers", JSON.stringify({ "X-CSRF-Token": meta.content }));
  }

  document.addEventListener("DOMContentLoaded", function () {
    applyTheme(storedTheme());
    var toggle = document.getElementById("theme-toggle");
    if (toggle) {
      toggle.addEventListener("click", function () {
        var next = THEMES[(THEMES.indexOf(storedTheme()) + 1) % THEMES.length];
        try {
          window.localStorage.setItem(KEY, next);
        } catch (e) {
          /* private mode: the choice lasts for this page only */
        }
        applyTheme(next);
      });
    }
  });
})();
