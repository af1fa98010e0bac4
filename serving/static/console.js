// medssl gateway console: keeps the overview's queue live (GET /api/v1/counters every 5 s,
// same origin, the browser's credentials). The pages work without it.
"use strict";
(function () {
  const cells = document.querySelectorAll("[data-counter]");
  if (!cells.length) return;
  async function refresh() {
    try {
      const response = await fetch("/api/v1/counters", { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) return;
      const c = await response.json();
      const values = { waiting: c.waiting, in_progress: c.in_progress, oldest_waiting_s: c.oldest_waiting_s,
                       failed: c.jobs.failed, "dead-letter": c.jobs["dead-letter"], done: c.jobs.done };
      cells.forEach(function (cell) {
        const v = values[cell.dataset.counter];
        cell.textContent = v === null || v === undefined ? "–" : String(v);
      });
    } catch (e) { /* the gateway is restarting: try again at the next tick */ }
  }
  setInterval(refresh, 5000);
})();
