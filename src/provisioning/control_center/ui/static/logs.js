// The task log viewer (templates/tasks/logs.html): follows the control center's re-sent log
// stream (Server-Sent Events, resumed after the last line seen when the connection drops),
// appends lines in batches (at most ~10 a second) so fast output keeps up, keeps at most
// data-max-lines lines in the page (the oldest go, and the page says so), and filters the
// lines it holds as you type.
(function () {
  "use strict";

  document.addEventListener("DOMContentLoaded", function () {
    var viewer = document.getElementById("log-viewer");
    if (!viewer) {
      return;
    }
    var box = document.getElementById("log-lines");
    var state = document.getElementById("log-state");
    var count = document.getElementById("log-count");
    var dropped = document.getElementById("log-dropped");
    var filter = document.getElementById("log-filter");
    var follow = document.getElementById("log-follow");
    var wrap = document.getElementById("log-wrap");
    var max = parseInt(viewer.getAttribute("data-max-lines"), 10) || 5000;
    var queue = [];
    var scheduled = false;
    var total = 0;
    var gone = 0;
    var needle = "";
    var source = null;
    var FLUSH_EVERY_MS = 100;
    var lastFlush = 0;
    var selfScroll = false;

    function matches(text) {
      return !needle || text.toLowerCase().indexOf(needle) >= 0;
    }

    function render(el, doc) {
      var text = String(doc.line === undefined ? "" : doc.line);
      el.textContent = "";
      var pos = document.createElement("span");
      pos.className = "pos";
      pos.textContent = doc.attempt + ":" + doc.n;
      el.appendChild(pos);
      if (needle) {
        var lower = text.toLowerCase();
        var at = 0;
        var hit = lower.indexOf(needle);
        while (hit >= 0) {
          el.appendChild(document.createTextNode(text.slice(at, hit)));
          var m = document.createElement("mark");
          m.textContent = text.slice(hit, hit + needle.length);
          el.appendChild(m);
          at = hit + needle.length;
          hit = lower.indexOf(needle, at);
        }
        el.appendChild(document.createTextNode(text.slice(at)));
      } else {
        el.appendChild(document.createTextNode(text));
      }
      el.classList.toggle("hidden", !matches(text));
    }

    function status() {
      // Counting the shown lines walks all of them: only while a filter is set.
      var shown = needle ? box.querySelectorAll(".log-line:not(.hidden)").length : 0;
      var held = box.childElementCount;
      count.textContent =
        total + " line" + (total === 1 ? "" : "s") + " received" +
        (needle ? "; " + shown + " of the " + held + " kept match \u201c" + needle + "\u201d" : "");
      if (gone > 0) {
        dropped.hidden = false;
        dropped.textContent =
          "The oldest " + gone + " line" + (gone === 1 ? " was" : "s were") +
          " dropped from the page: it keeps the last " + max + ". Download the log for all of it.";
      }
    }

    function flush() {
      scheduled = false;
      if (!queue.length) {
        return;
      }
      lastFlush = Date.now();
      var batch = queue;
      queue = [];
      if (batch.length > max) {
        gone += batch.length - max;
        batch = batch.slice(batch.length - max);
      }
      var frag = document.createDocumentFragment();
      for (var i = 0; i < batch.length; i++) {
        var el = document.createElement("span");
        var kind = batch[i].stream;
        el.className = "log-line" + (kind === "stderr" || kind === "system" ? " " + kind : "");
        el.setAttribute("data-pos", batch[i].attempt + ":" + batch[i].n);
        el.setAttribute("data-text", String(batch[i].line));
        render(el, batch[i]);
        frag.appendChild(el);
      }
      box.appendChild(frag);
      // Drop the oldest beyond the bound.
      var extra = box.childElementCount - max;
      while (extra > 0 && box.firstElementChild) {
        box.removeChild(box.firstElementChild);
        extra--;
        gone++;
      }
      if (follow.checked) {
        selfScroll = true; // the scroll event this causes is ours, not the reader's
        box.scrollTop = box.scrollHeight;
      }
      status();
    }

    function push(doc) {
      total++;
      queue.push(doc);
      if (queue.length > max) {
        gone += queue.length - max;
        queue.splice(0, queue.length - max);
      }
      if (!scheduled) {
        // At most ~10 flushes a second: each one lays the box out again (scrolling to the
        // end), so fast output is appended in fewer, larger batches.
        scheduled = true;
        var wait = Math.max(0, FLUSH_EVERY_MS - (Date.now() - lastFlush));
        window.setTimeout(function () {
          window.requestAnimationFrame(flush);
        }, wait);
        window.setTimeout(flush, wait + 250); // a background tab runs no animation frames
      }
    }

    function say(text) {
      state.textContent = text;
      viewer.setAttribute("data-state", text);
    }

    function connect() {
      source = new EventSource(viewer.getAttribute("data-stream"));
      source.addEventListener("open", function () {
        say("Following live");
      });
      source.addEventListener("log", function (ev) {
        try {
          push(JSON.parse(ev.data));
        } catch (e) {
          /* not a log line */
        }
      });
      source.addEventListener("end", function (ev) {
        var st = "";
        try {
          st = JSON.parse(ev.data).status || "";
        } catch (e) {
          st = "";
        }
        source.close();
        flush();
        say("The task ended" + (st && st !== "?" ? " (" + st + ")" : "") + "; the log is complete.");
        viewer.setAttribute("data-ended", "yes");
      });
      source.addEventListener("failure", function (ev) {
        var msg = "";
        try {
          msg = JSON.parse(ev.data).message || "";
        } catch (e) {
          msg = "";
        }
        source.close();
        say("The log cannot be followed: " + msg);
      });
      source.addEventListener("error", function () {
        if (source.readyState === EventSource.CLOSED) {
          say("Disconnected; reload the page to follow again.");
        } else {
          say("Reconnecting…");
        }
      });
    }

    var timer = 0;
    filter.addEventListener("input", function () {
      window.clearTimeout(timer);
      timer = window.setTimeout(function () {
        needle = filter.value.trim().toLowerCase();
        var lines = box.querySelectorAll(".log-line");
        for (var i = 0; i < lines.length; i++) {
          var el = lines[i];
          var pos = el.getAttribute("data-pos").split(":");
          render(el, { attempt: pos[0], n: pos[1], line: el.getAttribute("data-text") });
        }
        status();
      }, 120);
    });
    follow.addEventListener("change", function () {
      if (follow.checked) {
        box.scrollTop = box.scrollHeight;
      }
    });
    wrap.addEventListener("change", function () {
      box.classList.toggle("wrap", wrap.checked);
    });
    box.addEventListener("scroll", function () {
      if (selfScroll) {
        selfScroll = false;
        return;
      }
      // Scrolling up stops following; back at the bottom resumes it.
      var atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 8;
      follow.checked = atEnd;
    });
    connect();
  });
})();
