// Optional tooltips for the console's charts. The pages are complete without
// this script: every mark has a <title> and every chart a table beside it.
(function () {
  "use strict";
  var tip = null;

  function show(mark, x, y) {
    if (tip === null) {
      tip = document.createElement("div");
      tip.className = "tooltip";
      tip.setAttribute("role", "status");
      document.body.appendChild(tip);
    }
    tip.textContent = mark.getAttribute("data-label") + ": " + mark.getAttribute("data-value");
    tip.hidden = false;
    var left = Math.min(x + 12, window.innerWidth - tip.offsetWidth - 8);
    tip.style.left = Math.max(4, left) + window.scrollX + "px";
    tip.style.top = y + 12 + window.scrollY + "px";
  }

  function hide() {
    if (tip !== null) {
      tip.hidden = true;
    }
  }

  function enhance(mark) {
    // The custom tooltip replaces the browser's slower one from <title>.
    var title = mark.querySelector("title");
    if (title !== null) {
      mark.setAttribute("aria-label", title.textContent);
      mark.removeChild(title);
    }
    mark.addEventListener("mousemove", function (event) {
      show(mark, event.clientX, event.clientY);
    });
    mark.addEventListener("mouseleave", hide);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var marks = document.querySelectorAll("svg.chart [data-label]");
    for (var i = 0; i < marks.length; i += 1) {
      enhance(marks[i]);
    }
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape") {
        hide();
      }
    });
  });
})();
