// The workflow page's graph (templates/tasks/_graph.html): keyboard use of the task nodes and
// the selected task kept highlighted across the live refreshes of the graph.
(function () {
  "use strict";
  var selected = "";

  function mark() {
    var nodes = document.querySelectorAll(".dag-node");
    for (var i = 0; i < nodes.length; i++) {
      var on = nodes[i].getAttribute("data-task-id") === selected;
      nodes[i].classList.toggle("selected", on);
      nodes[i].setAttribute("aria-pressed", on ? "true" : "false");
    }
  }

  document.addEventListener("click", function (ev) {
    var target = ev.target instanceof Element ? ev.target : null;
    var node = target && target.closest(".dag-node, [data-task-link]");
    if (node) {
      selected = node.getAttribute("data-task-id") || node.getAttribute("data-task-link") || "";
      mark();
    }
  });

  document.addEventListener("keydown", function (ev) {
    var target = ev.target instanceof Element ? ev.target : null;
    if (target && target.classList.contains("dag-node") && (ev.key === "Enter" || ev.key === " ")) {
      ev.preventDefault();
      target.dispatchEvent(new MouseEvent("click", { bubbles: true }));
    }
  });

  document.addEventListener("htmx:afterSettle", function () {
    var detail = document.getElementById("task-detail");
    var shown = detail ? detail.getAttribute("data-task-id") : "";
    if (shown) {
      selected = shown;
    }
    mark();
  });
})();
