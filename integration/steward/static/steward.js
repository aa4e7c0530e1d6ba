// Steward workbench: keyboard shortcuts, queue row selection, merge preview, confirmations. No dependencies.
(function () {
  "use strict";

  function typing(target) {
    var tag = target && target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (target && target.isContentEditable);
  }

  // Queue: j/k move the selection, Enter opens it; a click on a row opens it.
  var rows = Array.prototype.slice.call(document.querySelectorAll("table.queue tr[data-href]"));
  var selected = -1;
  function select(index) {
    if (!rows.length) { return; }
    if (selected >= 0) { rows[selected].classList.remove("selected"); }
    selected = Math.max(0, Math.min(rows.length - 1, index));
    rows[selected].classList.add("selected");
    rows[selected].scrollIntoView({ block: "nearest" });
  }
  rows.forEach(function (row) {
    row.addEventListener("click", function (event) {
      if (event.target.closest("a, button, input, select")) { return; }
      window.location.href = row.getAttribute("data-href");
    });
  });

  // Cluster: choosing another record's value updates the "after the merge" column.
  document.querySelectorAll("input[type=radio][name^='field:']").forEach(function (radio) {
    radio.addEventListener("change", function () {
      var cell = document.querySelector("[data-preview='" + radio.name.slice(6) + "']");
      if (cell) { cell.textContent = radio.getAttribute("data-value"); }
    });
  });

  // Buttons that undo something ask first.
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });

  // A form is sent once: a second key press while the page loads does nothing.
  var sending = false;
  document.querySelectorAll("form").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (sending && form.method.toLowerCase() === "post") { event.preventDefault(); }
      sending = true;
    });
  });

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) { return; }
    var key = event.key;
    if (key === "?") {
      var help = document.getElementById("shortcuts");
      if (help) { help.hidden = !help.hidden; }
      event.preventDefault();
      return;
    }
    if (rows.length && (key === "j" || key === "k")) {
      select(selected + (key === "j" ? 1 : -1));
      event.preventDefault();
      return;
    }
    if (rows.length && (key === "Enter" || key === "o") && selected >= 0) {
      window.location.href = rows[selected].getAttribute("data-href");
      event.preventDefault();
      return;
    }
    var target = document.querySelector("[data-key='" + key + "']");
    if (target && !sending) {
      event.preventDefault();
      target.click();
    }
  });
})();
